"""Issue 12, the command-line half: what a careless or hostile user runs into.

One-line errors with exit status 2 (instead of tracebacks) for bad calibration files, bad
numbers, devices, truncated files, over-long paths, nothing to do; resource guards before any
allocation; Ctrl-C (130, journal kept); progress as plain lines in a log; -q silencing the
third-party bars; --help with defaults and --version; a capped QAT evaluation; a closed pipe.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (its log handler binds to stderr now, not to one test's capsys)
from conftest import one_line_error, run_cli

from binllm.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--nsamples", "2", "--seqlen", "64", "--eval", ""]


def quantize(capsys, stories, data, *extra, method="gptq"):
    return run_cli(capsys, "quantize", stories, "--method", method, "--calib", "ptb", *QUICK,
                   "--data-dir", data, *extra)


# -- calibration files -----------------------------------------------------------------------
@pytest.mark.parametrize("name,content,needles", [
    ("nul.txt", b"some text\x00\x01\x02 binary", ["nul.txt", "binary"]),
    ("latin1.txt", "first line\ncaf\u00e9 au lait\n".encode("latin-1"),
     ["latin1.txt, line 2", "not UTF-8"]),
    ("badline.jsonl", b'{"text": "fine"}\n{"text": broken\n', ["badline.jsonl, line 2", "JSON"]),
    ("notext.jsonl", b'{"text": "fine"}\n\n{"body": "x"}\n', ["notext.jsonl, line 3", '"text"']),
    ("nonstr.jsonl", b'{"text": 5}\n', ["nonstr.jsonl, line 1", "not a string"]),
])
def test_bad_calibration_files_are_one_line_errors_naming_file_and_line(
        capsys, tmp_path, stories, data, name, content, needles):
    path = tmp_path / name
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "quantize", stories, "--method", "rtn-sign", "--calib", path,
                           *QUICK, "--data-dir", data)
    one_line_error(code, err, *needles)


def test_missing_calibration_path_says_the_file_does_not_exist(capsys, stories, data):
    code, _, err = quantize(capsys, stories, data, "--calib", "cal/missing.txt")
    one_line_error(code, err, "cal/missing.txt does not exist")


# -- numbers, method arguments, devices --------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--block-size", "0"), ("--block-size", "-4"),
                                        ("--percdamp", "0"), ("--percdamp", "-0.1"),
                                        ("--percdamp", "nan"), ("--max-windows", "0"),
                                        ("--max-windows", "-3"), ("--nsamples", "0")])
def test_out_of_range_numbers_are_refused_before_any_work(capsys, stories, data, flag, value):
    code, _, err = quantize(capsys, stories, data, flag, value)
    one_line_error(code, err, flag)
    assert "layers" not in err  # nothing was calibrated


def test_quantize_config_rejects_nan_damping_with_its_own_error():
    from binllm.engine.config import ConfigError, QuantizeConfig

    for bad in (dict(percdamp=math.nan), dict(percdamp=0.0), dict(block_size=0)):
        with pytest.raises(ConfigError):
            QuantizeConfig("gptq", **bad)


@pytest.mark.parametrize("method", ["gptq", "rtn-sign"])
@pytest.mark.parametrize("groupsize", ["0", "-2"])
def test_groupsize_zero_or_below_minus_one_is_a_method_argument_error(
        capsys, stories, data, method, groupsize):
    from binllm.methods import MethodArgumentError, get_method

    with pytest.raises(MethodArgumentError, match=f"groupsize={groupsize}"):
        get_method(method, {"groupsize": groupsize})
    code, _, err = quantize(capsys, stories, data, "--method-arg", f"groupsize={groupsize}",
                            method=method)
    one_line_error(code, err, f"groupsize={groupsize}", "positive number of columns")


def test_unknown_device_is_a_one_line_error(capsys, stories, data):
    code, _, err = quantize(capsys, stories, data, "--device", "tpu")
    one_line_error(code, err, "--device tpu", "cpu, cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error(capsys, stories, data):
    code, _, err = quantize(capsys, stories, data, "--device", "cuda")
    one_line_error(code, err, "--device cuda", "--device cpu")


def test_cuda_build_without_a_visible_device_says_so(monkeypatch):
    from binllm.cli.errors import CLIError
    from binllm.cli.guards import check_device

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CLIError, match="no CUDA device is visible"):
        check_device("cuda:0")


@pytest.fixture(scope="module")
def saved_stories(stories, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "rtn"
    assert main(["-q", "quantize", stories, "--method", "rtn-sign", "--calib", "ptb",
                 "--nsamples", "2", "--seqlen", "32", "--eval", "", "--data-dir", data,
                 "--out", str(out)]) == 0
    return out


def test_generate_sampling_values_out_of_range(capsys, saved_stories):
    saved = saved_stories
    code, _, err = run_cli(capsys, "generate", saved, "Once", "--temperature", "-1", "--top-p", "2")
    one_line_error(code, err, "--temperature -1")
    code, _, err = run_cli(capsys, "generate", saved, "Once", "--temperature", "1", "--top-p", "2")
    one_line_error(code, err, "--top-p 2")


def test_eval_with_no_datasets_and_no_tasks_says_there_is_nothing_to_do(capsys, stories):
    code, _, err = run_cli(capsys, "eval", stories, "--datasets", "")
    one_line_error(code, err, "nothing to do")


# -- files and paths -------------------------------------------------------------------------
@pytest.fixture
def truncated(tmp_path, stories_path):
    d = tmp_path / "truncated"
    shutil.copytree(stories_path, d)
    for f in d.iterdir():
        f.chmod(0o644)
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate((d / "model.safetensors").stat().st_size // 2)
    return d


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_truncated_dense_safetensors_is_a_one_line_error(capsys, truncated, data, command):
    args = (["quantize", truncated, "--method", "gptq", *QUICK] if command == "quantize"
            else ["eval", truncated, "--datasets", "ptb"])
    code, _, err = run_cli(capsys, *args, "--data-dir", data)
    one_line_error(code, err, "model.safetensors is truncated")


def test_skipping_every_linear_is_refused_before_calibration(capsys, tmp_path, stories, data):
    out = tmp_path / "out"
    code, _, err = quantize(capsys, stories, data, "--out", out, "--skip",
                            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    one_line_error(code, err, "leaves no linear", "--skip")
    assert not out.exists()


def test_resume_dir_that_is_a_file(capsys, tmp_path, stories, data):
    f = tmp_path / "journal"
    f.write_text("not a folder")
    code, _, err = quantize(capsys, stories, data, "--resume-dir", f)
    one_line_error(code, err, "--resume-dir", "is a file")


@pytest.mark.parametrize("flag", ["--report", "--out", "--calib", "MODEL"])
def test_over_long_paths_are_one_line_errors(capsys, tmp_path, stories, data, flag):
    long = str(tmp_path / ("x" * 300) / "file.json")
    args = {"--report": ["quantize", stories, "--method", "gptq", "--report", long],
            "--out": ["quantize", stories, "--method", "gptq", "--out", "y/" * 2100],
            "--calib": ["quantize", stories, "--method", "gptq", "--calib", long],
            "MODEL": ["quantize", long, "--method", "gptq"]}[flag]
    code, _, err = run_cli(capsys, *args, *QUICK, "--data-dir", data)
    one_line_error(code, err, flag)


# -- resource guards ---------------------------------------------------------------------------
def test_huge_nsamples_is_refused_with_the_estimate(capsys, stories, data, monkeypatch):
    import binllm.evaluation.data as data_module

    def never(*a, **k):  # the refusal comes before any window is cut
        raise AssertionError("calibration windows were built before the refusal")

    monkeypatch.setattr(data_module, "calibration_batches", never)
    code, _, err = quantize(capsys, stories, data, "--nsamples", "100000000")
    line = one_line_error(code, err, "--nsamples 100000000", "calibration needs about",
                          "TiB", "available")
    assert "2 × 100000000 windows × 64 tokens × hidden 64 × 4 bytes" in line


def test_calibration_estimate_equals_what_the_walker_holds(tiny_llama_model):
    """Oracle: the bytes of the captured layer inputs (twice: inputs and outputs), of their
    rotary kwargs; the Hessians estimate is a lower bound of one layer's distinct accumulators
    (q/k/v and gate/up share one each; o_proj's own is the one not counted)."""
    from binllm.engine.walker import capture_layer_inputs, collect_hessians, find_decoder_layers
    from binllm.engine.memory import calibration_memory

    model, n, seqlen = tiny_llama_model, 3, 16
    batches = [torch.randint(0, 256, (1, seqlen)) for _ in range(n)]
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        inputs = capture_layer_inputs(model, layers, batches, "cpu")
        accs = collect_hessians(layers[0], inputs, ["self_attn.q_proj", "self_attn.k_proj",
                                                    "self_attn.v_proj", "self_attn.o_proj",
                                                    "mlp.gate_proj", "mlp.up_proj",
                                                    "mlp.down_proj"])

    def nbytes(obj):
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, (tuple, list)):
            return sum(nbytes(o) for o in obj)
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        return 0

    held = 2 * nbytes(inputs.hidden) + nbytes(inputs.kwargs.copy())
    est = calibration_memory(model, n, seqlen)
    assert est.activations == held
    distinct = {id(a): a.XtX.numel() * 4 for a in accs.values()}
    o_proj = accs["self_attn.o_proj"].XtX.numel() * 4
    assert len(distinct) == 4
    assert est.hessians == sum(distinct.values()) - o_proj


def _no_model_is_built(monkeypatch) -> None:
    """Fail the test if any transformers model is constructed (skeleton or weights): the
    refusal must come from the config and the files alone."""
    from transformers import PreTrainedModel

    def never(self, *a, **k):
        raise AssertionError(f"{type(self).__name__} was built before the refusal")

    monkeypatch.setattr(PreTrainedModel, "__init__", never)


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("change", [{"hidden_size": 1048576}, {"num_hidden_layers": 100000}])
def test_absurd_config_of_a_dense_model_is_refused_before_allocation(
        capsys, tmp_path, stories_path, data, change, monkeypatch):
    model = _with_config(stories_path, tmp_path / "absurd", **change)
    _no_model_is_built(monkeypatch)
    code, _, err = run_cli(capsys, "eval", model, "--datasets", "ptb", "--data-dir", data)
    key, value = next(iter(change.items()))
    one_line_error(code, err, f"{key}={value}", "does not belong to these weights")


@pytest.mark.parametrize("change", [{"hidden_size": 1048576}, {"num_hidden_layers": 100000}])
def test_absurd_config_of_a_saved_directory_is_refused_before_the_skeleton(
        capsys, tmp_path, change, monkeypatch):
    import binllm
    from binllm.preflight import PreflightError

    saved = _with_config(REPO / "tests" / "data" / "v1_gptq", tmp_path / "absurd", **change)
    _no_model_is_built(monkeypatch)
    with pytest.raises(PreflightError, match="does not belong to these weights"):
        binllm.load(saved)
    code, _, err = run_cli(capsys, "generate", saved, "Once")
    one_line_error(code, err, "config.json declares at least")


def test_config_larger_than_memory_is_refused_with_the_estimate(capsys, tmp_path, stories_path):
    d = tmp_path / "config_only"
    d.mkdir()
    cfg = json.loads((stories_path / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 1048576}))
    code, _, err = run_cli(capsys, "eval", d, "--datasets", "ptb")
    one_line_error(code, err, "loading needs at least", "TiB", "available")


# -- Ctrl-C -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigint_during_quantize_exits_130_with_one_line_and_keeps_the_journal(
        tmp_path, stories_path, data):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "deep"
    torch.manual_seed(0)
    layers = 24
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                 max_position_embeddings=128)).save_pretrained(model_dir)
    for f in stories_path.glob("tokenizer*"):
        shutil.copy(f, model_dir / f.name)
    journal = tmp_path / "journal"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "binllm", "-q", "quantize", str(model_dir), "--method", "gptq",
         "--calib", "ptb", "--nsamples", "4", "--seqlen", "32", "--eval", "", "--data-dir", data,
         "--resume-dir", str(journal)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # a job started in the background by a non-interactive shell inherits SIGINT ignored,
        # and Python then installs no KeyboardInterrupt handler: give the child the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not list(journal.glob("layer_*.safetensors")) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert lines[-1] == (f"binllm: interrupted; finished layers are kept in {journal}, "
                         "rerun the same command to resume")
    done = sorted(journal.glob("layer_*.safetensors"))
    assert (journal / "journal.json").is_file() and 1 <= len(done) < layers
    assert not [p for p in journal.iterdir() if ".tmp-" in p.name]


# -- friction ---------------------------------------------------------------------------------
def test_progress_into_a_log_is_plain_lines(capsys, stories, data):
    """capsys' stderr is not a terminal: one line per layer and per dataset, no redraws."""
    code, _, err = run_cli(capsys, "quantize", stories, "--method", "rtn-sign", "--calib", "ptb",
                           "--nsamples", "2", "--seqlen", "64", "--data-dir", data,
                           "--eval", "tinystories", "--max-windows", "2", quiet=False)
    assert code == 0, err
    assert "\r" not in err
    layer_lines = [line for line in err.splitlines() if line.startswith("rtn-sign: ")]
    assert [line.split(",")[0] for line in layer_lines] == [
        f"rtn-sign: {i}/5 layers" for i in range(1, 6)]
    assert [line.split(",")[0] for line in err.splitlines() if line.startswith("ppl ")] == [
        "ppl tinystories: 5/5 layers"]  # the binarized model is evaluated layer by layer
    assert "Loading weights" not in err


def test_quiet_silences_transformers_bars_and_prints_no_progress(capsys, stories, data):
    code, _, err = run_cli(capsys, "eval", stories, "--datasets", "tinystories", "--max-windows",
                           "1", "--data-dir", data)
    assert code == 0, err
    assert "Loading weights" not in err and "ppl tinystories" not in err and "\r" not in err


def test_third_party_bars_are_disabled_in_the_block_and_restored_after(capsys):
    import tqdm
    import tqdm.auto

    from binllm.cli.progress import third_party_bars_off

    with third_party_bars_off(True):
        for cls in (tqdm.tqdm, tqdm.auto.tqdm):
            bar = cls(range(3), disable=False, file=sys.stderr)
            assert bar.disable
            bar.close()
    bar = tqdm.tqdm(range(3), disable=False, file=sys.stderr)
    assert not bar.disable
    bar.close()


def test_every_option_has_help_with_its_default_and_version_works(capsys):
    import argparse

    from binllm import __version__
    from binllm.cli.app import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items()
               for a in p._actions if not a.help]
    assert not missing
    text = sub.choices["quantize"].format_help()
    for default in ("calibration windows (default: 128)", "(default: 0)", "(default: 0.01)",
                    "(default: c4)"):
        assert default in " ".join(text.split()), default
    qat = " ".join(sub.choices["qat"].format_help().split())
    assert "optimizer steps (default: 1000)" in qat and "(default: 0.0001)" in qat
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"binllm {__version__} (torch ")


def test_qat_evaluates_a_capped_number_of_windows_by_default_and_says_so(
        capsys, tmp_path, stories, data):
    report = tmp_path / "qat.json"
    code, out, err = run_cli(capsys, "qat", stories, "--train", "tinystories", "--steps", "1",
                             "--batch-size", "1", "--grad-accum", "1", "--seqlen", "32",
                             "--eval", "ptb", "--data-dir", data, "--report", report)
    assert code == 0, err
    assert "first 64 windows" in out and "--max-windows all" in out
    ppl = json.loads(report.read_text())["perplexity"]["ptb"]
    assert ppl["windows"] == 64 < ppl["total_windows"]


def test_closed_stdout_pipe_exits_quietly(monkeypatch, capsys):
    """`binllm methods | head -1`: stdout is a pipe whose reader is gone."""
    read, write = os.pipe()
    os.close(read)
    pipe = open(write, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", pipe)
    try:
        code = main(["methods"])
    finally:
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            pipe.close()
    assert code == 141
    assert capsys.readouterr().err == ""


# -- result files: checked before the work, usual permissions -------------------------------
def _bad_reports(tmp_path: Path) -> list[tuple[Path, str]]:
    (tmp_path / "a_file").write_text("x")
    return [(tmp_path, "is a folder"),
            (tmp_path / "a_file" / "r.json", "is a file, not a folder"),
            (Path("/proc/binllm-report.json"), "cannot write in /proc")]


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_a_report_that_cannot_be_written_is_refused_before_the_model_is_built(
        capsys, tmp_path, stories, data, monkeypatch, command):
    _no_model_is_built(monkeypatch)
    args = (["quantize", stories, "--method", "rtn-sign", *QUICK] if command == "quantize"
            else ["eval", stories, "--datasets", "ptb"])
    for report, needle in _bad_reports(tmp_path):
        code, _, err = run_cli(capsys, *args, "--data-dir", data, "--report", report)
        one_line_error(code, err, f"--report {report}", needle)


def test_inspect_refuses_an_unwritable_report_before_reading_the_model(
        capsys, tmp_path, saved_stories, monkeypatch):
    import binllm.packed.saved_dir as saved_dir

    def never(*a, **k):
        raise AssertionError("the model was inspected before the refusal")

    monkeypatch.setattr(saved_dir, "inspect_saved", never)
    for report, needle in _bad_reports(tmp_path):
        code, _, err = run_cli(capsys, "inspect", saved_stories, "--report", report)
        one_line_error(code, err, f"--report {report}", needle)


def test_symbolic_link_loops_are_reported_as_such(capsys, tmp_path, stories, data):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, _, err = run_cli(capsys, "eval", stories, "--datasets", "ptb", "--data-dir", data,
                           "--report", loop)
    one_line_error(code, err, f"--report {loop}", "loop of symbolic links")
    code, _, err = run_cli(capsys, "eval", loop, "--datasets", "ptb")
    one_line_error(code, err, f"MODEL {loop}", "loop of symbolic links")


def test_inspect_of_a_config_that_is_no_json_object_is_one_line(capsys, tmp_path):
    for text, kind in (("[1, 2]", "a list"), ("null", "null"), ("7", "a number")):
        (tmp_path / "config.json").write_text(text)
        code, _, err = run_cli(capsys, "inspect", tmp_path)
        one_line_error(code, err, "config.json holds " + kind, "not a JSON object")


def test_reports_and_atomic_files_get_the_usual_permissions(capsys, tmp_path, stories, data):
    from binllm.atomic import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
        code, _, err = run_cli(capsys, "eval", stories, "--datasets", "ptb", "--data-dir", data,
                               "--max-windows", "1", "--report", tmp_path / "eval.json")
        os.umask(0o027)
        write_json_atomic(tmp_path / "group.json", {"a": 1})
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "eval.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "group.json").stat().st_mode & 0o777 == 0o640  # the umask decides


# -- library messages name the argument, the command line its flag ---------------------------
def test_library_errors_name_arguments_and_the_cli_names_flags(capsys, tmp_path, stories, data,
                                                                stories_model):
    from binllm.engine.checks import UnknownSkip, check_skip
    from binllm.packed.output import OutputExists, check_output_dir

    with pytest.raises(UnknownSkip) as e:
        check_skip(stories_model, ("foo_proj",))
    assert str(e.value).startswith("skip=foo_proj matches no linear") and "--" not in str(e.value)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputExists) as e:
        check_output_dir(tmp_path / "full")
    assert "pass overwrite=True" in str(e.value) and "--" not in str(e.value)
    code, _, err = quantize(capsys, stories, data, "--out", tmp_path / "full")
    one_line_error(code, err, f"--out {tmp_path / 'full'} exists", "pass --overwrite to replace",
                   "choose another --out")


@pytest.mark.parametrize("library,cli", [
    ("skip=down_projx matches no linear; drop names from skip=",
     "--skip down_projx matches no linear; drop names from --skip"),
    ("pass overwrite=True to replace it, or choose another out_dir=",
     "pass --overwrite to replace it, or choose another --out"),
    ("use feedback='none'", "use --feedback none"),
    ("checkpoint c.pt not found; drop resume= to start a new run",
     "checkpoint c.pt not found; drop --resume to start a new run"),
    ("seqlen=4096 exceeds the context; use seqlen=512 or less, or a smaller seqlen=.",
     "--seqlen 4096 exceeds the context; use --seqlen 512 or less, or a smaller --seqlen."),
    ("method spec 'gptq:bits=2:layout=3' and bits='x'", "method spec 'gptq:bits=2:layout=3' and "
     "bits='x'"),  # method arguments stay as written
])
def test_cli_message_turns_argument_names_into_flags(library, cli):
    from binllm.cli.errors import cli_message

    assert cli_message(library) == cli


def test_a_broken_kernel_cache_warning_says_what_to_delete_and_where(tmp_path, monkeypatch):
    import binllm.kernels.cpu as cpu

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker))
    monkeypatch.delenv("BINLLM_KERNELS", raising=False)
    cpu.extension.cache_clear()
    try:
        status = cpu.extension()
    finally:
        cpu.extension.cache_clear()  # the next caller loads from torch's usual cache again
    assert not status.ok
    assert f"TORCH_EXTENSIONS_DIR={blocker}" in status.reason
    assert "delete the binllm_cpu_" in status.reason and "set TORCH_EXTENSIONS_DIR" in status.reason


def test_a_failed_kernel_build_names_the_compilers_first_error():
    from binllm.kernels.cpu_build import build_failure

    e = RuntimeError("Error building extension 'binllm_cpu_x': [1/3] c++ -MMD -MF a.o.d -O3\n"
                     "FAILED: a.o\n/src/a.cpp: In function 'void f()':\n"
                     "/src/a.cpp:50:61: error: 'g' was not declared in this scope\n"
                     "/src/a.cpp:60:1: error: a later error\nninja: build stopped")
    msg = build_failure(e)
    assert msg.startswith("RuntimeError: Error building extension 'binllm_cpu_x'")
    assert msg.endswith("/src/a.cpp:50:61: error: 'g' was not declared in this scope")
    assert build_failure(OSError("ninja not found")) == "OSError: ninja not found"
