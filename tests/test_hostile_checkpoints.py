"""Checkpoints that read outside the model, or the wrong bytes: refused on every path.

Sharded or edited copies of stories260K (dense, streamed by default) and of saved binllm
directories; each case is one the code before `binllm.safetensors_io` got wrong (a file
outside the model followed, overlapping bytes read, a config.json that disagrees with the
weights run, a layout edit computing other weights, the autoload hook off for "0"), asserted
by the exit code, the one-line message and what was (not) opened or built.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import binllm
from binllm.packed.saved_dir import CheckpointError
from binllm.cli import main
from conftest import one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--calib", "tinystories", "--calib-split", "validation", "--nsamples", "2",
         "--seqlen", "64", "--eval", ""]
INDEX = "model.safetensors.index.json"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def _sharded(stories_path: Path, dst: Path, n: int = 4) -> Path:
    """stories260K in n shards with an index, the way save_pretrained shards."""
    d = _copy(stories_path, dst)
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = list(tensors)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for i, name in enumerate(names):
        part = keys[i * len(keys) // n:(i + 1) * len(keys) // n]
        save_file({k: tensors[k] for k in part}, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _rename_in_index(d: Path, old: str, new: str) -> None:
    index = json.loads((d / INDEX).read_text())
    index["weight_map"] = {k: new if v == old else v for k, v in index["weight_map"].items()}
    (d / INDEX).write_text(json.dumps(index))


def _quantize(capsys, model: Path, out: Path, data: str):
    return run_cli(capsys, "quantize", model, "--method", "rtn-sign", *QUICK, "--data-dir", data,
                   "--out", out)


# -- 1. names outside the model directory --------------------------------------------------------
@pytest.mark.parametrize("outside", ["../outside/model-00004-of-00004.safetensors",
                                     "../../../../../etc/passwd"])
def test_streamed_quantize_refuses_an_index_entry_outside_the_model(
        capsys, tmp_path, stories_path, data, outside):
    d = _sharded(stories_path, tmp_path / "model")
    (tmp_path / "outside").mkdir()
    os.replace(d / "model-00004-of-00004.safetensors",
               tmp_path / "outside" / "model-00004-of-00004.safetensors")
    _rename_in_index(d, "model-00004-of-00004.safetensors", outside)
    code, _, err = _quantize(capsys, d, tmp_path / "out", data)
    one_line_error(code, err, outside, "points outside the model directory")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def saved(stories, data, tmp_path_factory) -> dict[str, Path]:
    """stories260K saved by today's binllm: q1_0, and gptq with groupsize 32."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name, extra in (("q1_0", []), ("gptq", ["--method-arg", "groupsize=32"])):
        code = main(["-q", "quantize", stories, "--method", name, *extra, *QUICK,
                                "--data-dir", data, "--out", str(root / name)])
        assert code == 0
        out[name] = root / name
    return out


def _edit_qc(d: Path, edit) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))


def test_inspect_verify_refuses_a_files_name_outside_before_hashing_it(
        capsys, tmp_path, saved, monkeypatch):
    d = _copy(saved["gptq"], tmp_path / "gptq")
    other = _copy(saved["gptq"], tmp_path / "other")
    (d / "model.safetensors").unlink()
    _edit_qc(d, lambda qc: qc.update(files={"../other/model.safetensors":
                                            qc["files"]["model.safetensors"]}))
    import binllm.packed.saved_dir as saved_dir

    hashed = []
    real = saved_dir.sha256_file
    monkeypatch.setattr(saved_dir, "sha256_file", lambda f: hashed.append(f) or real(f))
    code, _, err = run_cli(capsys, "inspect", d, "--verify")
    one_line_error(code, err, "../other/model.safetensors", "points outside the model directory")
    assert hashed == [] and (other / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match="points outside the model directory"):
        binllm.load(d)


def test_a_files_name_with_a_directory_part_is_refused(tmp_path, saved):
    d = _copy(saved["gptq"], tmp_path / "gptq")
    (d / "sub").mkdir()
    os.replace(d / "model.safetensors", d / "sub" / "model.safetensors")
    _edit_qc(d, lambda qc: qc.update(files={"sub/model.safetensors":
                                            qc["files"]["model.safetensors"]}))
    with pytest.raises(CheckpointError, match="not a file directly in the model directory"):
        binllm.load(d)


# -- 2. overlapping data offsets -----------------------------------------------------------------
def _point_into_embedding(f: Path, key: str) -> None:
    """Rewrite the header so that `key`'s bytes are read from the embedding's first bytes."""
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    start, stop = header[key]["data_offsets"]
    header[key]["data_offsets"] = [0, stop - start]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def test_streamed_quantize_refuses_overlapping_offsets(capsys, tmp_path, stories_path, data):
    d = _copy(stories_path, tmp_path / "model")
    _point_into_embedding(d / "model.safetensors", "model.layers.4.self_attn.v_proj.weight")
    code, _, err = _quantize(capsys, d, tmp_path / "out", data)
    line = one_line_error(code, err, "model.safetensors", "invalid offset",
                          "model.layers.4.self_attn.v_proj.weight")
    assert "model.embed_tokens.weight" in line
    assert not (tmp_path / "out").exists()


# -- 3. config.json that disagrees with the checkpoint -------------------------------------------
def _with_config(stories_path: Path, dst: Path, **changes) -> Path:
    d = _copy(stories_path, dst)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return d


def _no_model_is_built(monkeypatch) -> None:
    from transformers import PreTrainedModel

    def never(self, *a, **k):
        raise AssertionError(f"{type(self).__name__} was built before the refusal")

    monkeypatch.setattr(PreTrainedModel, "__init__", never)


@pytest.mark.parametrize("change,needles", [
    ({"hidden_size": 128}, ["config.json and the weights disagree", "model.embed_tokens.weight",
                            "(512, 128)", "(512, 64)"]),
    ({"num_hidden_layers": 4}, ["config.json and the weights disagree",
                                "model.layers.4.input_layernorm.weight"]),
])
def test_streamed_quantize_refuses_a_config_that_disagrees_with_the_weights(
        capsys, tmp_path, stories_path, data, change, needles):
    d = _with_config(stories_path, tmp_path / "model", **change)
    code, _, err = _quantize(capsys, d, tmp_path / "out", data)
    one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", [{"hidden_size": 1048576}, {"num_hidden_layers": 100000}])
def test_streamed_quantize_refuses_an_absurd_config_before_building_the_model(
        capsys, tmp_path, stories_path, data, change, monkeypatch):
    d = _with_config(stories_path, tmp_path / "model", **change)
    _no_model_is_built(monkeypatch)
    code, _, err = _quantize(capsys, d, tmp_path / "out", data)
    key, value = next(iter(change.items()))
    one_line_error(code, err, f"{key}={value}", "does not belong to these weights")


# -- 4. layout edits of a saved directory --------------------------------------------------------
LAYOUT_EDITS = {"q1_0": ("block_size", 100), "gptq": ("groupsize", 33)}


def _edit_layouts(d: Path, field: str, value) -> None:
    def edit(qc):
        for layout in qc["layers"].values():
            assert field in layout["params"]
            layout["params"][field] = value
    _edit_qc(d, edit)


@pytest.mark.parametrize("method", sorted(LAYOUT_EDITS))
def test_a_layout_edit_that_keeps_the_shapes_is_refused_on_every_load_path(
        capsys, tmp_path, saved, data, method):
    d = _copy(saved[method], tmp_path / method)
    binllm.load(d)  # the untouched copy loads
    _edit_layouts(d, *LAYOUT_EDITS[method])
    with pytest.raises(CheckpointError, match="quantization_config.layers differs"):
        binllm.load(d)
    from transformers import AutoModelForCausalLM

    with pytest.raises(CheckpointError, match="quantization_config.layers differs"):
        AutoModelForCausalLM.from_pretrained(d)
    code, _, err = run_cli(capsys, "inspect", d, "--verify")
    one_line_error(code, err, "quantization_config.layers differs", "model.safetensors")
    code, _, err = run_cli(capsys, "eval", d, "--datasets", "tinystories", "--eval-split",
                           "validation", "--max-windows", "1", "--data-dir", data)
    one_line_error(code, err, "quantization_config.layers differs")


# -- 5. BINLLM_NO_AUTOLOAD -----------------------------------------------------------------------
@pytest.mark.parametrize("value,off", [("0", False), ("false", False), ("", False), ("no", False),
                                       ("1", True), ("true", True), ("YES", True),
                                       ("True", True)])
def test_only_a_true_value_of_binllm_no_autoload_turns_the_hook_off(value, off):
    code = ("import sys, binllm_autoload\n"
            "binllm_autoload.install()\n"
            "print(any(isinstance(f, binllm_autoload.AutoloadBinllm) for f in sys.meta_path))\n")
    env = {**os.environ, "BINLLM_NO_AUTOLOAD": value}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(not off)
