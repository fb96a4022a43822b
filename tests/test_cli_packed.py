"""`binllm quantize --out`, `inspect`, `generate` and `eval` on a saved directory, in-process."""

from __future__ import annotations

import json
import re

import pytest
import transformers  # noqa: F401  (its log handler binds to stderr now, not to one test's capsys)
from conftest import run_cli

from binllm.cli import main

QUICK = ["--nsamples", "2", "--seqlen", "32"]


@pytest.fixture(scope="module")
def saved(stories_path, data, tmp_path_factory):
    """stories260K binarized with rtn-sign, saved, with the in-memory perplexity in its report."""
    tmp = tmp_path_factory.mktemp("cli")
    code = main(["-q", "quantize", str(stories_path), "--method", "rtn-sign", "--calib",
                 "tinystories", *QUICK, "--data-dir", data, "--eval", "tinystories",
                 "--max-windows", "2", "--out", str(tmp / "model"),
                 "--report", str(tmp / "q.json")])
    assert code == 0
    return tmp / "model", json.loads((tmp / "q.json").read_text())


def test_quantize_out_writes_a_loadable_directory(saved):
    out, report = saved
    assert report["out"] == str(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "binllm_report.json"):
        assert (out / name).is_file()


def test_inspect_prints_the_disk_bits_and_they_match_the_codes_accounting(capsys, saved, tmp_path):
    out, report = saved
    code, text, _ = run_cli(capsys, "inspect", out, "--report", tmp_path / "i.json")
    assert code == 0
    quant = report["quantization"]
    total = re.search(r"35 binarized linears, ([\d.]+) stored bits/weight measured on disk "
                      r"\(= ([\d.]+) by the codes' accounting\), ([\d.]+) paper bits", text)
    assert total, text
    assert float(total[1]) == pytest.approx(quant["stored_bits"], abs=5e-4)
    assert float(total[3]) == pytest.approx(quant["paper_bits"], abs=5e-4)
    assert "model.layers.4.mlp.down_proj" in text and "vs fp16" in text
    info = json.loads((tmp_path / "i.json").read_text())
    by_name = {r["name"]: r for r in quant["linears"]}
    for lay in info["layers"]:
        assert lay["stored_bits"] == lay["codes_bits"] == by_name[lay["name"]]["stored_bits"]
    assert info["file_bytes"] < info["fp16_bytes"]


def test_eval_of_the_saved_directory_reproduces_the_in_memory_perplexity(capsys, saved, data,
                                                                         tmp_path):
    out, report = saved
    code, _, _ = run_cli(capsys, "eval", out, "--datasets", "tinystories", "--max-windows", "2",
                         "--seqlen", "32", "--data-dir", data, "--report", tmp_path / "e.json")
    assert code == 0
    ppl = json.loads((tmp_path / "e.json").read_text())["perplexity"]["tinystories"]["ppl"]
    # binllm eval runs the fast kernels: the in-memory perplexity to fp32 round-off
    assert ppl == pytest.approx(report["perplexity"]["tinystories"]["ppl"], rel=1e-5)


def test_eval_with_the_int8_prefill_is_close_to_the_exact_perplexity(capsys, saved, data,
                                                                      tmp_path, stories_path):
    out, _ = saved
    ppl = {}
    for prefill in ("exact", "int8"):
        report = tmp_path / f"{prefill}.json"
        code, _, err = run_cli(capsys, "eval", out, "--datasets", "tinystories", "--max-windows",
                               "2", "--seqlen", "64", "--data-dir", data, "--prefill", prefill,
                               "--report", report)
        assert code == 0, err
        doc = json.loads(report.read_text())
        assert doc["prefill"] == prefill
        ppl[prefill] = doc["perplexity"]["tinystories"]["ppl"]
    assert ppl["int8"] != ppl["exact"] and ppl["int8"] == pytest.approx(ppl["exact"], rel=0.02)
    code, _, err = run_cli(capsys, "eval", stories_path, "--datasets", "tinystories",
                           "--data-dir", data, "--prefill", "int8")
    assert code == 2 and "has none (drop --prefill)" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "generate", out, "hi", "--prefill", "int8",
                           "--cache-dequantized")
    assert code == 2 and "drop --cache-dequantized" in err and "Traceback" not in err


@pytest.mark.parametrize("cache", [[], ["--no-cache"], ["--cache-dequantized"]])
def test_generate_continues_the_prompt(capsys, saved, cache):
    out, _ = saved
    code, text, _ = run_cli(capsys, "generate", out, "Once upon a time", "--max-new-tokens", "6",
                            *cache)
    assert code == 0
    assert text.startswith("Once upon a time") and re.search(r"6 new tokens in .* tokens/s", text)


def test_generate_in_bf16_prints_the_speed_note_where_the_cpu_lacks_bf16(capsys, monkeypatch,
                                                                        saved):
    """The note goes to stderr (stdout is the text), here for a CPU whose flags name no bf16
    instructions."""
    from binllm.cli import guards, packed

    monkeypatch.setattr(packed, "bf16_speed_note",
                        lambda dtype, device: guards.bf16_speed_note(dtype, device, "flags : fpu"))
    out, _ = saved
    code, text, err = run_cli(capsys, "generate", out, "Once upon a time", "--max-new-tokens",
                              "2", "--dtype", "bfloat16")
    assert code == 0 and text.startswith("Once upon a time")
    assert "note: the model computes in bfloat16" in err and "--dtype float32" in err


def test_inspect_and_generate_refuse_an_ordinary_model(capsys, stories_path):
    code, _, err = run_cli(capsys, "inspect", stories_path)
    assert code == 2 and "not a binllm model" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "generate", stories_path, "hi")
    assert code == 2 and "not a binllm directory" in err


def test_quantize_refuses_a_non_empty_out_before_working(capsys, stories_path, data, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    code, _, err = run_cli(capsys, "quantize", stories_path, "--method", "rtn-sign", *QUICK,
                           "--data-dir", data, "--eval", "", "--out", tmp_path)
    assert code == 2 and "--overwrite" in err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
