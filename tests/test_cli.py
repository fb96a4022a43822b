"""The CLI in-process: quantize/eval/methods on stories260K, and a one-line error with exit
code 2 for every kind of bad input the issue lists."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers  # noqa: F401  (its log handler binds to stderr now, not to one test's capsys)
from conftest import one_line_error, run_cli, tiny_causal_lm
from torch import nn

from binllm.cli import main

QUICK = ["--nsamples", "2", "--seqlen", "64"]


# -- happy paths -----------------------------------------------------------------------------
def test_methods_lists_every_method_with_its_arguments(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0
    for word in ("rtn-sign", "gptq", "bits", "groupsize"):
        assert word in out


@pytest.mark.parametrize("method,margs,bits", [("gptq", ["--method-arg", "bits=3"], 3.0),
                                               ("rtn-sign", [], 1.0)])
def test_quantize_writes_a_complete_report(capsys, tmp_path, stories, data, method, margs, bits):
    report = tmp_path / "out" / "report.json"
    code, out, err = run_cli(capsys, "quantize", stories, "--method", method, *margs,
                             "--calib", "ptb", "--nsamples", "4", "--seqlen", "128",
                             "--eval", "tinystories,ptb", "--max-windows", "3",
                             "--data-dir", data, "--report", report)
    assert code == 0, err
    r = json.loads(report.read_text())
    q = r["quantization"]
    assert q["method"] == method
    scales = {"scale_dtype": "float16", "scale_rounding": "after"}
    assert q["method_args"] == ({"bits": 3, "groupsize": -1, **scales} if method == "gptq"
                                else {"groupsize": -1, **scales})
    assert r["protocol"] == {
        "calibration": "ptb", "calibration_split": "validation",
        "calibration_note": "ptb: train split not available locally; used validation",
        "nsamples": 4, "seqlen": 128, "seed": 0, "eval_split": "test", "max_windows": 3}
    assert len(q["linears"]) == 5 * 7  # stories260K: 5 layers × 7 linears
    for lin in q["linears"]:
        assert lin["paper_bits"] == bits and lin["stored_bits"] > bits
        assert math.isfinite(lin["loss"]) and lin["loss"] >= 0 and lin["seconds"] >= 0
        assert lin["calibration_loss"] == pytest.approx(lin["loss"], rel=0.05)  # before rounding
        assert (lin["percdamp"] is None) == (method == "rtn-sign")
    assert q["paper_bits"] == bits and q["peak_memory_mb"] > 0
    for name in ("tinystories", "ptb"):
        ppl = r["perplexity"][name]
        assert ppl["windows"] == 3 and ppl["total_windows"] > 3 and ppl["split"] == "test"
        assert 1 < ppl["ppl"] < 1e5
    assert "note: ptb: train split not available" in out  # the note is also printed
    assert "tinystories" in out and "ptb" in out  # the table


def test_eval_reports_the_known_tinystories_perplexity(capsys, tmp_path, stories, data):
    report = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "eval", stories, "--datasets", "tinystories",
                             "--seqlen", "512", "--data-dir", data, "--report", report)
    assert code == 0, err
    r = json.loads(report.read_text())
    res = r["perplexity"]["tinystories"]
    assert (r["seqlen"], res["windows"], res["total_windows"]) == (512, 28, 28)
    assert res["ppl"] == pytest.approx(3.678, abs=5e-3)
    assert "3.678" in out


def test_bf16_speed_note_names_the_missing_instructions_and_the_faster_dtype():
    from binllm.cli.guards import bf16_speed_note

    note = bf16_speed_note(torch.bfloat16, "cpu", flags="flags : fpu avx512f avx512_vnni")
    assert "no bfloat16 instructions" in note and "--dtype float32" in note
    for flags in ("flags : avx512f avx512_bf16", "flags : avx512f amx_bf16 amx_tile"):
        assert bf16_speed_note(torch.bfloat16, "cpu", flags=flags) is None
    assert bf16_speed_note(torch.float32, "cpu", flags="flags : fpu") is None
    assert bf16_speed_note(torch.bfloat16, "cuda", flags="flags : fpu") is None


def test_eval_of_a_bf16_model_prints_the_speed_note_where_the_cpu_lacks_bf16(
        capsys, monkeypatch, stories, data):
    """The note `eval` prints, here for a CPU whose flags name no bf16 instructions."""
    from binllm.cli import evaluate, guards

    monkeypatch.setattr(evaluate, "bf16_speed_note",
                        lambda dtype, device: guards.bf16_speed_note(dtype, device, "flags : fpu"))
    code, out, err = run_cli(capsys, "eval", stories, "--datasets", "tinystories", "--dtype",
                             "bfloat16", "--max-windows", "1", "--seqlen", "128",
                             "--data-dir", data)
    assert code == 0, err
    assert "note: the model computes in bfloat16" in out
    code, out, err = run_cli(capsys, "eval", stories, "--datasets", "tinystories",
                             "--max-windows", "1", "--seqlen", "128", "--data-dir", data)
    assert code == 0 and "bfloat16" not in out  # stories260K is float32


# -- bad input -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, stories_tokenizer):
    """Tiny saved models with the stories260K tokenizer (vocab 512): a healthy LLaMA, one with
    a NaN weight, a GPT-2 (Conv1D, no nn.Linear) and a model without decoder layers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("models")
    dirs = {}

    def save(name, model):
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        stories_tokenizer.save_pretrained(dirs[name])

    save("llama", tiny_causal_lm("llama", vocab_size=512))
    nan = tiny_causal_lm("llama", vocab_size=512)
    nan.model.layers[1].mlp.down_proj.weight.data[3, 5] = float("nan")
    save("nan", nan)
    torch.manual_seed(0)
    save("gpt2", GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=512,
                                            n_positions=128, bos_token_id=1, eos_token_id=2)))
    save("blob", _blob_model())
    (root / "empty").mkdir()
    dirs["empty"] = root / "empty"
    return dirs


def _blob_model():
    """A registered causal LM whose only linears sit directly on the model: no layer list."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class BlobConfig(PretrainedConfig):
        model_type = "binllm-test-blob"

        def __init__(self, hidden_size=16, vocab_size=512, **kwargs):
            self.hidden_size, self.vocab_size = hidden_size, vocab_size
            super().__init__(**kwargs)

    class BlobForCausalLM(PreTrainedModel):
        config_class = BlobConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            self.mix = nn.Linear(config.hidden_size, config.hidden_size)
            self.head = nn.Linear(config.hidden_size, config.vocab_size)
            self.post_init()

        def forward(self, input_ids, **kwargs):
            return CausalLMOutput(logits=self.head(self.mix(self.embed(input_ids))))

    AutoConfig.register(BlobConfig.model_type, BlobConfig, exist_ok=True)
    AutoModelForCausalLM.register(BlobConfig, BlobForCausalLM, exist_ok=True)
    return BlobForCausalLM(BlobConfig())


def test_missing_model_path(capsys, tmp_path, data):
    code, _, err = run_cli(capsys, "quantize", tmp_path / "no" / "such" / "model",
                           "--method", "gptq", *QUICK, "--data-dir", data)
    one_line_error(code, err, "not found")


def test_directory_that_is_not_a_model(capsys, model_dirs, data):
    code, _, err = run_cli(capsys, "eval", model_dirs["empty"], "--datasets", "tinystories",
                           "--data-dir", data)
    one_line_error(code, err, "config.json")


@pytest.mark.parametrize("name,needle", [("blob", "cannot find the decoder layers"),
                                         ("gpt2", "no nn.Linear")])
def test_architecture_the_walker_cannot_binarize(capsys, model_dirs, data, name, needle):
    code, _, err = run_cli(capsys, "quantize", model_dirs[name], "--method", "rtn-sign",
                           "--calib", "tinystories", *QUICK, "--eval", "", "--data-dir", data)
    one_line_error(code, err, needle)


@pytest.mark.parametrize("margs,needles", [
    (["--method", "sign-of-the-times"], ["unknown method 'sign-of-the-times'", "gptq"]),
    (["--method", "gptq", "--method-arg", "colour=blue"],
     ["unknown method argument 'colour'", "bits"]),
    (["--method", "gptq", "--method-arg", "bits=nine"], ["bits='nine'", "int"]),
    (["--method", "gptq", "--method-arg", "bits=12"], ["1 to 8 bits"]),
    (["--method", "gptq", "--method-arg", "bits"], ["KEY=VALUE"]),
])
def test_bad_method_or_argument(capsys, model_dirs, data, margs, needles):
    code, _, err = run_cli(capsys, "quantize", model_dirs["llama"], *margs, *QUICK,
                           "--data-dir", data)
    one_line_error(code, err, *needles)


@pytest.mark.parametrize("argv,needle", [(["--nsamples", "0"], "--nsamples must be at least 1"),
                                         (["--seqlen", "1"], "--seqlen 1: use at least 2")])
def test_nonsense_sizes(capsys, stories, data, argv, needle):
    code, _, err = run_cli(capsys, "quantize", stories, "--method", "gptq", *argv,
                           "--data-dir", data)
    one_line_error(code, err, needle)


def test_seqlen_beyond_the_models_context(capsys, stories, data):
    code, _, err = run_cli(capsys, "quantize", stories, "--method", "gptq", "--seqlen", "1024",
                           "--data-dir", data)
    one_line_error(code, err, "--seqlen 1024", "context of 512", "--seqlen 512")


def test_too_few_calibration_tokens(capsys, tmp_path, model_dirs, data):
    txt = tmp_path / "calib.txt"
    txt.write_text("Once upon a time.")
    code, _, err = run_cli(capsys, "quantize", model_dirs["llama"], "--method", "gptq",
                           "--calib", txt, *QUICK, "--eval", "", "--data-dir", data)
    one_line_error(code, err, "calib.txt", "fewer than one calibration window of 64")


def test_nan_in_a_weight(capsys, model_dirs, data):
    code, _, err = run_cli(capsys, "quantize", model_dirs["nan"], "--method", "gptq",
                           "--calib", "tinystories", *QUICK, "--eval", "", "--data-dir", data)
    one_line_error(code, err, "model.layers.1.mlp.down_proj.weight", "NaN")


def test_unknown_eval_dataset(capsys, stories, data):
    code, _, err = run_cli(capsys, "eval", stories, "--datasets", "wikitext103", "--data-dir", data)
    one_line_error(code, err, "unknown dataset 'wikitext103'")


def test_healthy_tiny_model_quantizes(capsys, model_dirs, data):
    """The control for the error cases: the same tiny LLaMA without the NaN goes through."""
    code, out, err = run_cli(capsys, "quantize", model_dirs["llama"], "--method", "gptq",
                             "--calib", "tinystories", *QUICK, "--eval", "", "--data-dir", data)
    assert code == 0, err
    assert "14 linears" in out


def test_tasks_without_lm_eval_fail_before_any_work(stories_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # import fails as if not installed
    code = main(["-q", "quantize", str(stories_path), "--method", "rtn-sign", "--calib",
                 "tinystories", "--nsamples", "2", "--seqlen", "64", "--eval", "",
                 "--tasks", "arc_easy"])
    out = capsys.readouterr()
    assert code == 2 and "lm-eval is not installed" in out.err
    assert "linears in" not in out.out  # refused before binarizing
