"""Issue 12, silent wrong results and data loss: what a careless or hostile user runs into.

One test (or a few) per item; every case is a run that today's code got wrong (random weights,
corrupt data used, files deleted, work lost), asserted by its observable effect: the logits,
the files left on disk, the exit code and the first line of the message.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import binllm
from binllm.atomic import OutputLock
from binllm.engine.binarize import NonFiniteWeights, UnknownSkip, binarize_model
from binllm.engine.config import QuantizeConfig
from binllm.engine.journal import JournalMismatch, LayerJournal, run_identity
from binllm.packed.checkpoint import CorruptCheckpoint, load_binarized, save_binarized
from binllm.packed.layers import BinaryLinear
from binllm.packed.output import OutputError, OutputExists, check_output_dir
from conftest import random_windows, run_cli, tiny_llama

REPO = Path(__file__).resolve().parents[1]
V1 = REPO / "tests" / "data" / "v1_billm"
QUICK = ["--method", "rtn-sign", "--calib", "tinystories", "--calib-split", "validation",
         "--nsamples", "2", "--seqlen", "64", "--eval", ""]


def first_line(err: str) -> str:
    """The error line (progress bars of transformers may precede it on stderr)."""
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("binllm: error:")]
    return lines[0] if lines else ""


def logits(model) -> torch.Tensor:
    ids = torch.arange(1, 25).reshape(2, 12) % 256
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def v1_copy(tmp_path) -> Path:
    return Path(shutil.copytree(V1, tmp_path / "billm"))




WINDOWS = random_windows(2, 16)  # calibration windows (read only)


# -- 1. a plain transformers load without `import binllm` -----------------------------------
@pytest.mark.slow
def test_pth_hook_loads_binllm_dirs_in_a_process_that_never_imports_binllm(tmp_path):
    """The shipped .pth line, processed as at start-up (site.addsitedir), makes a plain
    from_pretrained give BinaryLinears with binllm.load's logits, and imports nothing first."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(REPO / "binllm_autoload.pth", site)
    code = f"""
import site, sys
sys.path.insert(0, {str(REPO)!r})
site.addsitedir({str(site)!r})
assert "binllm" not in sys.modules and "torch" not in sys.modules
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(V1)!r})
import torch, binllm
ids = torch.arange(1, 13)[None]
with torch.no_grad():
    same = torch.equal(m(ids).logits, binllm.load({str(V1)!r})(ids).logits)
print(type(m.model.layers[0].mlp.down_proj).__name__, same)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["BinaryLinear", "True"]


@pytest.mark.slow
def test_wheel_and_editable_wheel_ship_the_pth_at_the_top_of_site_packages(tmp_path):
    pytest.importorskip("setuptools", minversion="70.1")  # bdist_wheel built in
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        "tests", "benchmarks", "*.egg-info", "build", "dist", ".git", "__pycache__", "out", "runs"))
    code = """
import sys, zipfile
from setuptools import build_meta
dist = sys.argv[1]  # build_meta rewrites sys.argv
for build in (build_meta.build_wheel, build_meta.build_editable):
    name = build(dist)
    names = zipfile.ZipFile(f"{dist}/{name}").namelist()
    print("RESULT", name.split("-")[2], "binllm_autoload.pth" in names)
"""
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    results = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("RESULT")]
    assert results == [["py3", "True"], ["0.editable", "True"]]


# -- 2. from_pretrained runs binllm.load's integrity checks ----------------------------------
def _loaders():
    from transformers import AutoModelForCausalLM

    return [("binllm.load", binllm.load), ("from_pretrained", AutoModelForCausalLM.from_pretrained)]


def test_flipped_bytes_in_a_packed_tensor_are_refused_by_both_loaders(v1_copy):
    f = v1_copy / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-200:-190] = bytes(b ^ 0xFF for b in raw[-200:-190])  # same size, data changed
    f.write_bytes(bytes(raw))
    for name, load in _loaders():
        with pytest.raises(CorruptCheckpoint, match="model.safetensors does not match the "
                                                    "checksum"):
            load(v1_copy)


def test_a_linear_removed_from_quantization_config_is_refused_by_both_loaders(v1_copy):
    cfg = json.loads((v1_copy / "config.json").read_text())
    del cfg["quantization_config"]["layers"]["model.layers.0.mlp.down_proj"]
    (v1_copy / "config.json").write_text(json.dumps(cfg))
    for name, load in _loaders():
        with pytest.raises(CorruptCheckpoint, match=r"packed codes of \['model.layers.0.mlp."
                                                    r"down_proj'\].*no layout"):
            load(v1_copy)


def test_inspect_verify_says_what_it_verified(capsys, v1_copy):
    code, out, _ = run_cli(capsys, "inspect", v1_copy, "--verify")
    assert code == 0
    assert ("verified: 1 shard, 7 binarized linears, 47 tensors: sizes and sha256 checksums "
            "match the save") in out


# -- 3. a damaged journal layer file ----------------------------------------------------------
def test_a_journal_layer_with_overwritten_bytes_is_refused_by_name(tmp_path):
    model, config, calib = tiny_llama(), QuantizeConfig("rtn-sign"), WINDOWS
    journal = LayerJournal(tmp_path / "j", run_identity(model, config, calib))
    binarize_model(copy.deepcopy(model), config, calib, journal=journal)
    f = tmp_path / "j" / "layer_00001.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-100:] = b"\xff" * 100  # the damage: last 100 bytes, size unchanged
    f.write_bytes(bytes(raw))
    with pytest.raises(JournalMismatch, match=r"layer_00001.safetensors is damaged.*sha256.*"
                                              "delete that file"):
        binarize_model(copy.deepcopy(model), config, calib, journal=journal)
    with pytest.raises(JournalMismatch, match="layer_00001"):
        journal.verify()


# -- 4. NaN / Inf anywhere, refused before the first layer ------------------------------------
@pytest.mark.parametrize("key", ["model.embed_tokens.weight", "model.norm.weight",
                                 "lm_head.weight", "model.layers.1.mlp.down_proj.weight"])
def test_non_finite_tensors_are_refused_before_any_layer_is_touched(key):
    model = tiny_llama()
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    tensor = model.get_parameter(key)
    with torch.no_grad():
        tensor.view(-1)[3] = float("nan")
        tensor.view(-1)[5] = float("inf")
    layers_done = []
    with pytest.raises(NonFiniteWeights, match=f"^{key} holds 1 NaN and 1 Inf"):
        binarize_model(model, QuantizeConfig("rtn-sign"), WINDOWS,
                       on_layer=lambda i, n: layers_done.append(i))
    assert layers_done == []
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_a_non_finite_linear_met_during_the_walk_is_refused_with_the_same_message():
    """A streamed layer's weights are read only when its turn comes (binarize_model's up-front
    check sees them on the meta device): the per-linear check words the error alike."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.view(-1)[3] = float("inf")
    with pytest.raises(NonFiniteWeights, match=r"^model\.layers\.1\.mlp\.down_proj\.weight "
                                               r"holds 0 NaN and 1 Inf values \(of 8192\); "):
        binarize_model(model, QuantizeConfig("rtn-sign"), WINDOWS, checked=True)


@pytest.fixture(scope="module")
def nan_stories(stories_path, tmp_path_factory):
    """stories260K with one NaN in the final norm, as an ordinary HF directory."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("nan") / "stories"
    model = AutoModelForCausalLM.from_pretrained(stories_path)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(d)
    for f in stories_path.glob("tokenizer*"):
        shutil.copy(f, d)
    shutil.copy(stories_path / "special_tokens_map.json", d)
    return d


def test_cli_refuses_a_nan_norm_before_calibrating(capsys, nan_stories, data, tmp_path):
    code, out, err = run_cli(capsys, "quantize", nan_stories, *QUICK, "--data-dir", data,
                             "--compare-fp", "--out", tmp_path / "out")
    assert code == 2 and first_line(err).startswith("binllm: error: model.norm.weight holds 1 NaN")
    assert "full precision" not in out and not (tmp_path / "out").exists()


def test_cli_in_memory_quantize_checks_the_weights_once(capsys, stories_path, data, monkeypatch):
    import binllm.engine.binarize as binarize

    calls = []
    real = binarize.check_finite
    monkeypatch.setattr(binarize, "check_finite", lambda model: calls.append(1) or real(model))
    code, _, err = run_cli(capsys, "quantize", stories_path, *QUICK, "--data-dir", data,
                           "--no-stream")
    assert code == 0, err
    assert len(calls) == 1  # check_model before calibrating; binarize_model does not repeat it


# -- 5. --skip names that match nothing -------------------------------------------------------
def test_skip_matching_nothing_lists_the_linears():
    with pytest.raises(UnknownSkip, match="foo_proj matches no linear.*self_attn.q_proj, "
                                          r".*mlp.down_proj \(a name or its last part"):
        binarize_model(tiny_llama(), QuantizeConfig("rtn-sign", skip=("foo_proj",)), WINDOWS)
    binarize_model(tiny_llama(), QuantizeConfig("rtn-sign", skip=("down_proj",)), WINDOWS)


def test_cli_skip_matching_nothing_is_a_one_line_error(capsys, stories_path, data):
    code, _, err = run_cli(capsys, "quantize", stories_path, *QUICK, "--data-dir", data,
                           "--skip", "foo_proj")
    assert code == 2 and "--skip foo_proj matches no linear of LlamaForCausalLM" in err
    assert "self_attn.q_proj" in err and "Traceback" not in err


# -- 6. --overwrite deletes only binllm outputs -----------------------------------------------
@pytest.fixture
def own_model(stories_path, tmp_path) -> Path:
    """A copy of stories260K with a precious file beside it, in tmp/models/stories."""
    d = tmp_path / "models" / "stories"
    shutil.copytree(stories_path, d)
    (tmp_path / "models" / "precious.txt").write_text("keep me")
    return d


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("target,what", [("model", "is the input model"),
                                         ("parent", "contains the input model")])
def test_overwrite_never_replaces_the_input_model_or_a_folder_holding_it(capsys, own_model,
                                                                         data, target, what):
    out = own_model if target == "model" else own_model.parent
    before = _tree(own_model.parent)
    code, _, err = run_cli(capsys, "quantize", own_model, *QUICK, "--data-dir", data,
                           "--out", out, "--overwrite")
    assert code == 2 and what in first_line(err)
    assert _tree(own_model.parent) == before


def test_overwrite_refuses_a_folder_that_is_not_a_binllm_output(capsys, stories_path, data,
                                                                tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "quantize", stories_path, *QUICK, "--data-dir", data,
                           "--out", tmp_path / "mine", "--overwrite")
    assert code == 2 and "is not a binllm output directory" in first_line(err)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    model = tiny_llama()
    report = binarize_model(model, QuantizeConfig("rtn-sign"), WINDOWS)
    with pytest.raises(OutputExists, match="not a binllm output"):
        save_binarized(model, report, None, tmp_path / "mine", overwrite=True)
    save_binarized(model, report, None, tmp_path / "binllm_out")
    save_binarized(model, report, None, tmp_path / "binllm_out", overwrite=True)  # its own: ok


# -- 7. what can be checked before calibration, and the work kept when the save fails --------
def test_a_name_too_long_for_the_temporary_suffix_is_refused_before_work(capsys, stories_path,
                                                                        data, tmp_path):
    code, out, err = run_cli(capsys, "quantize", stories_path, *QUICK, "--data-dir", data,
                             "--out", tmp_path / ("x" * 245))
    assert code == 2 and "use a name of at most 229" in first_line(err)
    assert "linears in" not in out  # nothing was calibrated


def test_an_unwritable_parent_is_refused_before_work(capsys, stories_path, data):
    code, out, err = run_cli(capsys, "quantize", stories_path, *QUICK, "--data-dir", data,
                             "--out", "/proc/binllm-test/out")
    assert code == 2 and first_line(err).startswith("binllm: error: cannot write in /proc")
    assert "linears in" not in out


def test_too_little_free_space_is_refused(tmp_path):
    with pytest.raises(OutputError, match="free, the packed model needs at least"):
        check_output_dir(tmp_path / "out", needed_bytes=2**62)
    check_output_dir(tmp_path / "out", needed_bytes=1)


def test_a_second_run_writing_the_same_out_stops_at_once(capsys, stories_path, data, tmp_path):
    with OutputLock(tmp_path / "out"):
        code, out, err = run_cli(capsys, "quantize", stories_path, *QUICK, "--data-dir", data,
                                 "--out", tmp_path / "out")
    assert code == 2
    assert f"another binllm process (pid {os.getpid()}) is writing" in first_line(err)
    assert "linears in" not in out and sorted(os.listdir(tmp_path)) == []


def test_a_failed_save_keeps_the_work_as_a_journal_that_resumes(capsys, stories_path, data,
                                                                tmp_path, monkeypatch):
    import binllm.packed.checkpoint as ckpt

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_shards", full_disk)
    # the in-memory path saves at the end (a streamed run writes as it goes: --resume-dir)
    argv = ["quantize", stories_path, *QUICK, "--data-dir", data, "--out", tmp_path / "out",
            "--no-stream"]
    code, _, err = run_cli(capsys, *argv)
    line = first_line(err)
    assert code == 2 and "No space left on device" in line and "kept in" in line
    kept = Path(line.split("--resume-dir ")[1].split(" to save")[0])
    assert len(list(kept.glob("layer_*.safetensors"))) == 5
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    code, out, _ = run_cli(capsys, *argv, "--resume-dir", kept)
    assert code == 0 and "resuming: 5 layers restored" in out
    loaded = load_binarized(tmp_path / "out")
    assert sum(isinstance(m, BinaryLinear) for m in loaded.modules()) == 35
    shutil.rmtree(kept)


# -- 8. stale partial directories of killed saves ---------------------------------------------
@pytest.mark.slow
def test_partials_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".m.partial-{dead}-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    live = tmp_path / ".m.partial-1-efgh5678"  # pid 1 is alive
    live.mkdir()
    other = tmp_path / f".other.partial-{dead}-ijkl9012"  # another target's: not ours
    other.mkdir()
    model = tiny_llama()
    save_binarized(model, binarize_model(model, QuantizeConfig("rtn-sign"), WINDOWS), None,
                   tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name, other.name])


@pytest.mark.slow
def test_a_killed_save_leaves_a_partial_that_the_next_save_removes(tmp_path, monkeypatch):
    """A save entered by a process that then dies (the context is never left, as under
    SIGKILL) leaves its partial directory, named by the real code; the next save removes it."""
    from binllm.atomic import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setattr(os, "getpid", lambda: int(dead))
    killed = atomic_dir(tmp_path / "m")
    (killed.__enter__() / "model.safetensors").write_bytes(b"half written")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()][0].startswith(f".m.partial-{dead}-")
    model = tiny_llama()
    save_binarized(model, binarize_model(model, QuantizeConfig("rtn-sign"), WINDOWS), None,
                   tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# -- friction: save_pretrained of a loaded binllm model -------------------------------------
def test_save_pretrained_of_a_loaded_model_writes_the_packed_format_again(tmp_path):
    from transformers import AutoModelForCausalLM

    ref = load_file(str(REPO / "tests" / "data" / "v1_billm_logits.safetensors"))
    for i, load in enumerate([binllm.load, AutoModelForCausalLM.from_pretrained]):
        out = tmp_path / f"resaved{i}"
        load(V1).save_pretrained(out, max_shard_size="10KB")
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert len(cfg["files"]) > 1 and cfg["layers"] == json.loads(
            (V1 / "config.json").read_text())["quantization_config"]["layers"]
        for again in (binllm.load(out), AutoModelForCausalLM.from_pretrained(out)):
            with torch.no_grad():
                got = again(ref["input_ids"]).logits
            torch.testing.assert_close(got, ref["logits"], rtol=1e-4, atol=1e-5)
    with pytest.raises(OutputError, match="is the input model"):
        binllm.load(out).save_pretrained(out)
