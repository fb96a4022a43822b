"""`binllm compare`: method specs, one process per method (a failure loses nothing else),
resuming, the markdown table against results.json, and the plot skipped without matplotlib.

Most tests run the runner with a stand-in for `python -m binllm` (a few lines of Python that
write a report the way `binllm quantize --report` does), so they take milliseconds; one test
runs the real command on stories260K."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from binllm.evaluation.compare import (CompareError, MethodRun, Protocol, markdown,
                                       parse_method_spec, parse_method_specs, run_comparison)

FAKE = textwrap.dedent('''
    import json, sys
    argv = sys.argv[1:]
    with open(CALLS, "a") as f:
        f.write(" ".join(argv) + "\\n")
    report = argv[argv.index("--report") + 1]
    datasets = argv[argv.index("--eval" if argv[0] == "quantize" else "--datasets") + 1]
    ppl = {d: {"ppl": 10.0 + len(argv) + i, "windows": 3, "total_windows": 9}
           for i, d in enumerate(datasets.split(","))}
    if argv[0] == "eval":
        json.dump({"perplexity": ppl}, open(report, "w"))
        sys.exit(0)
    method = argv[argv.index("--method") + 1]
    margs = [argv[i + 1] for i, a in enumerate(argv) if a == "--method-arg"]
    if any(a.endswith("=sleep") for a in margs):
        import time
        time.sleep(30)
    if any(a.endswith("=bad") for a in margs):
        print("binllm: error: x='bad': expected a value of type int", file=sys.stderr)
        sys.exit(2)
    print(f"{method}:  60%|######    | 3/5 [00:01<00:01]", end="\\r", file=sys.stderr, flush=True)
    q = {"method_args": dict(a.split("=") for a in margs), "paper_bits": 1.0 + len(margs),
         "stored_bits": 1.5 + len(margs) + len(method) / 100, "seconds": 0.25,
         "peak_memory_mb": 123.0}
    json.dump({"quantization": q, "perplexity": ppl, "protocol": {}}, open(report, "w"))
''')


@pytest.fixture()
def fake(tmp_path):
    calls = tmp_path / "calls.txt"
    script = tmp_path / "fake_binllm.py"
    script.write_text(f"CALLS = {str(calls)!r}\n" + FAKE)
    return [sys.executable, str(script)], calls


def _calls(calls):
    return calls.read_text().splitlines() if calls.exists() else []


PROTOCOL = Protocol("some/model", calib="wikitext2", nsamples=4, seqlen=32,
                    eval=("tinystories", "ptb"), max_windows=3)


def test_a_spec_dtype_loads_and_calibrates_the_model_in_it():
    run = parse_method_spec("q1_0:refine=block:dtype=float32")
    assert run.args == () and dict(run.engine) == {"refine": "block", "dtype": "float32"}
    argv = Protocol(model="m").quantize_argv(run, Path("r.json"))
    assert argv[argv.index("--dtype") + 1] == "float32"


def test_method_specs_map_to_method_args():
    assert parse_method_spec("gptq:bits=2:groupsize=128") == MethodRun(
        "gptq:bits=2:groupsize=128", "gptq", (("bits", "2"), ("groupsize", "128")))
    assert parse_method_spec(" billm ") == MethodRun("billm", "billm", ())
    runs = parse_method_specs("billm,arb-llm-rc:intra_block=true,gptq:bits=3")
    assert [r.method for r in runs] == ["billm", "arb-llm-rc", "gptq"]
    assert runs[1].args == (("intra_block", "true"),)
    argv = PROTOCOL.quantize_argv(runs[1], "r.json")
    assert argv[argv.index("--method-arg") + 1] == "intra_block=true"
    for bad in ("gptq:bits", ":bits=2", "gptq:=2"):
        with pytest.raises(CompareError):
            parse_method_spec(bad)
    with pytest.raises(CompareError, match="given twice"):
        parse_method_specs("billm,billm")
    with pytest.raises(CompareError, match="empty"):
        parse_method_specs(" , ")


def test_a_failing_method_loses_nothing_and_a_rerun_skips_what_finished(tmp_path, fake):
    launcher, calls = fake
    runs = parse_method_specs("rtn-sign,gptq:bits=bad,billm")
    events = []
    res = run_comparison(runs, PROTOCOL, tmp_path / "out", launcher=launcher,
                         progress=events.append, plot=False)
    rows = {r["label"]: r for r in json.loads(res.results_path.read_text())["runs"]}
    assert [r["status"] for r in rows.values()] == ["ok", "failed", "ok"]  # spec order
    assert "expected a value of type int" in rows["gptq:bits=bad"]["error"]
    assert rows["billm"]["stored_bits"] == pytest.approx(1.5 + 0.05)
    assert len(_calls(calls)) == 4  # FP + three methods
    assert any(e.stage == "layers" and (e.label, e.done, e.of) == ("billm", 3, 5) for e in events)

    events.clear()
    again = run_comparison(runs, PROTOCOL, tmp_path / "out", launcher=launcher,
                           progress=events.append, plot=False)
    assert again.skipped == ["rtn-sign", "billm"] and again.ran == ["gptq:bits=bad"]
    assert len(_calls(calls)) == 5  # only the failed method ran again, FP not at all
    assert json.loads(again.results_path.read_text())["runs"][0] == rows["rtn-sign"]


def test_a_method_past_its_timeout_is_killed_and_recorded(tmp_path, fake):
    launcher, _ = fake
    res = run_comparison(parse_method_specs("rtn-sign:x=sleep,billm"), PROTOCOL, tmp_path,
                         launcher=launcher, plot=False, fp=False, timeout=1.0)
    slow, ok = res.results["runs"]
    assert slow["status"] == "failed" and "timed out after 1 s" in slow["error"]
    assert ok["status"] == "ok" and res.results["fp"] is None


def test_a_changed_protocol_is_refused_and_fresh_starts_over(tmp_path, fake):
    launcher, calls = fake
    runs = parse_method_specs("rtn-sign")
    run_comparison(runs, PROTOCOL, tmp_path, launcher=launcher, plot=False)
    other = Protocol(**{**PROTOCOL.__dict__, "nsamples": 8})
    with pytest.raises(CompareError, match="differs in: nsamples"):
        run_comparison(runs, other, tmp_path, launcher=launcher, plot=False)
    assert len(_calls(calls)) == 2
    res = run_comparison(runs, other, tmp_path, launcher=launcher, plot=False, fresh=True)
    assert res.ran == ["rtn-sign"] and res.results["protocol"]["nsamples"] == 8
    assert "--nsamples 8" in _calls(calls)[-1]


def test_markdown_table_shows_what_results_json_holds(tmp_path, fake):
    launcher, _ = fake
    res = run_comparison(parse_method_specs("rtn-sign,gptq:bits=2,billm:x=bad"), PROTOCOL,
                         tmp_path, launcher=launcher, plot=False)
    results = json.loads(res.results_path.read_text())
    text = res.markdown_path.read_text()
    assert text == markdown(results)
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert table["method"] == ["tinystories", "ptb", "paper bits", "stored bits", "quant s",
                               "peak MiB"]
    fp = results["fp"]["perplexity"]
    assert table["FP"][:2] == [f"{fp['tinystories']['ppl']:.2f}", f"{fp['ptb']['ppl']:.2f}"]
    for r in results["runs"]:
        cells = table[r["label"]]
        if r["status"] != "ok":
            assert cells[0].startswith("failed: ") and r["error"] in cells[0]
            continue
        assert cells == [f"{r['perplexity']['tinystories']['ppl']:.2f}",
                         f"{r['perplexity']['ptb']['ppl']:.2f}", f"{r['paper_bits']:.3f}",
                         f"{r['stored_bits']:.3f}", f"{r['seconds']:.1f}",
                         f"{r['peak_memory_mb']:.0f}"]
    assert "Windows per dataset: tinystories 3/9, ptb 3/9" in text


def test_plot_is_drawn_with_matplotlib_and_skipped_without(tmp_path, fake, monkeypatch):
    launcher, _ = fake
    runs = parse_method_specs("rtn-sign")
    pytest.importorskip("matplotlib")
    res = run_comparison(runs, PROTOCOL, tmp_path / "a", launcher=launcher)
    assert res.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res.plot_skipped is None
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    res = run_comparison(runs, PROTOCOL, tmp_path / "b", launcher=launcher)
    assert res.plot_path is None and "binllm[plot]" in res.plot_skipped
    assert not (tmp_path / "b" / "frontier.png").exists()


@pytest.mark.slow
def test_cli_compare_runs_each_method_in_its_own_process(tmp_path, shared, capsys,
                                                          monkeypatch):
    """The real command on stories260K: rtn-sign succeeds, a groupsize that does not divide
    the block size fails in its own child, and without matplotlib the command says that the
    plot was skipped."""
    from binllm.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "cmp"
    code = main(["-q", "compare", str(shared / "models" / "stories260K"), "--methods",
                 "rtn-sign,gptq:groupsize=100", "--no-fp", "--calib", "wikitext2",
                 "--calib-split", "validation", "--nsamples", "1", "--seqlen", "32", "--eval",
                 "tinystories", "--max-windows", "1", "--data-dir", str(shared / "data"),
                 "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 1  # one method failed
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[0]["stored_bits"] > 1 and rows[0]["perplexity"]["tinystories"]["windows"] == 1
    assert "groupsize=100 must divide the block size" in rows[1]["error"]
    assert "plot skipped" in text and "binllm[plot]" in text
    assert "| rtn-sign | " in text and "failed: gptq:groupsize=100" in text


# -- the command line checks everything before the first child -------------------------------
def _compare(capsys, stories, data, out, *extra, methods="rtn-sign"):
    from conftest import run_cli

    return run_cli(capsys, "compare", stories, "--methods", methods, "--calib", "ptb",
                   "--nsamples", "1", "--seqlen", "32", "--eval", "tinystories",
                   "--max-windows", "1", "--data-dir", data, "--out", out, *extra)


@pytest.mark.parametrize("methods,extra,needles", [
    ("rtn-sign,nope", [], ["method spec 'nope'", "unknown method 'nope'"]),
    ("gptq:bitz=2", [], ["method spec 'gptq:bitz=2'", "unknown method argument 'bitz'"]),
    ("gptq:bits=x", [], ["bits='x'", "type int"]),
    ("q1_0:refine=blok", [], ["refine=blok: use none or block"]),
    ("q1_0:refine_epochs=2", [], ["refine_epochs needs refine=block"]),
    ("q1_0:distill=kl", [], ["distill=kl: use none or logits"]),
    ("q1_0:distill_lr=0.01", [], ["distill_lr needs distill=logits"]),
    ("q1_0:distill=logits:distill_topk=0", [], ["distill topk=0: use a positive count"]),
    ("q1_0:rotate=haddamard", [], ["rotate=haddamard: use none or hadamard"]),
    ("q1_0:dtype=fp32", [], ["dtype=fp32: use auto, float32, float16, bfloat16"]),
    ("q1_0:feedback=rows", [], ["--feedback rows: use column, block or none"]),
    ("binary-factor:feedback=block", [], ["binary-factor runs with --feedback none or "
                                          "--feedback column only"]),
    ("rtn-sign", ["--seqlen", "0"], ["--seqlen 0: use at least 2 tokens"]),
    ("rtn-sign", ["--seqlen", "1024"], ["--seqlen 1024 exceeds the model's context of 512"]),
    ("rtn-sign", ["--eval", "tinystories,wikitext3"], ["unknown dataset 'wikitext3'"]),
    ("rtn-sign", ["--calib", "no/such.txt"], ["file no/such.txt does not exist"]),
])
def test_cli_compare_refuses_bad_input_before_any_child_and_before_out(
        capsys, tmp_path, stories, data, monkeypatch, methods, extra, needles):
    from conftest import one_line_error

    import binllm.evaluation.compare as compare

    def never(*a, **k):
        raise AssertionError("a child ran before the refusal")

    monkeypatch.setattr(compare, "run_child", never)
    out = tmp_path / "cmp"
    code, _, err = _compare(capsys, stories, data, out, *extra, methods=methods)
    one_line_error(code, err, *needles)
    assert not out.exists()


def test_cli_compare_refuses_a_missing_model_before_out(capsys, tmp_path, data):
    from conftest import one_line_error

    out = tmp_path / "cmp"
    code, _, err = _compare(capsys, str(tmp_path / "no-model"), data, out)
    one_line_error(code, err, "no-model' not found")
    assert not out.exists()


def test_max_windows_all_is_accepted_as_by_quantize():
    from binllm.cli.app import build_parser

    argv = ["compare", "m", "--methods", "rtn-sign", "--out", "o", "--max-windows"]
    assert build_parser().parse_args([*argv, "all"]).max_windows is None
    assert build_parser().parse_args([*argv, "3"]).max_windows == 3


def test_an_out_that_is_a_file_or_below_one_is_one_line(capsys, tmp_path, stories, data, fake):
    from conftest import one_line_error

    launcher, _ = fake
    (tmp_path / "f").write_text("x")
    for out, needle in ((tmp_path / "f", "is a file, not a folder"),
                        (tmp_path / "f" / "sub", f"{tmp_path / 'f'} is a file, not a folder")):
        code, _, err = _compare(capsys, stories, data, out)
        one_line_error(code, err, f"--out {out}", needle)
        with pytest.raises(CompareError, match="out_dir="):
            run_comparison(parse_method_specs("rtn-sign"), PROTOCOL, out, launcher=launcher,
                           plot=False)


@pytest.mark.parametrize("content", ["[]", "null", "{}", '"text"'])
def test_a_results_json_that_is_not_ours_is_refused_and_kept(capsys, tmp_path, stories, data,
                                                            fake, content):
    from conftest import one_line_error

    launcher, calls = fake
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(CompareError, match="not a results file of `binllm compare`"):
        run_comparison(parse_method_specs("rtn-sign"), PROTOCOL, tmp_path, launcher=launcher,
                       plot=False)
    code, _, err = _compare(capsys, stories, data, tmp_path)
    one_line_error(code, err, "not a results file", "choose another --out", "pass --fresh")
    assert (tmp_path / "results.json").read_text() == content and not _calls(calls)


def test_result_files_get_the_usual_permissions(tmp_path, fake):
    import os

    launcher, _ = fake
    old = os.umask(0o022)
    try:
        res = run_comparison(parse_method_specs("rtn-sign"), PROTOCOL, tmp_path,
                             launcher=launcher, plot=False)
    finally:
        os.umask(old)
    for path in (res.results_path, res.markdown_path):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_other_inputs_under_the_same_settings_are_refused(tmp_path, fake, shared):
    """Same settings, another data directory or another model behind the same path: the
    results would mix under one column, so the rerun is refused naming what changed."""
    import shutil

    launcher, _ = fake
    data = tmp_path / "data"
    shutil.copytree(shared / "data" / "wikitext-2-raw", data / "wikitext-2-raw")
    model = tmp_path / "model"
    shutil.copytree(shared / "models" / "stories260K", model)
    proto = Protocol(str(model), calib="wikitext2", calib_split="validation", nsamples=4,
                     seqlen=32, eval=("wikitext2",), max_windows=3, data_dir=str(data))
    runs = parse_method_specs("rtn-sign")
    run_comparison(runs, proto, tmp_path / "out", launcher=launcher, plot=False)
    test_file = next((data / "wikitext-2-raw").rglob("*test*"))
    test_file.write_text(test_file.read_text()[:-100])  # another wikitext2 test text
    with pytest.raises(CompareError, match=r"differs in: inputs \(data wikitext2:test\)"):
        run_comparison(runs, proto, tmp_path / "out", launcher=launcher, plot=False)
    shutil.copytree(shared / "data" / "wikitext-2-raw", data / "wikitext-2-raw",
                    dirs_exist_ok=True)
    (model / "config.json").write_text((model / "config.json").read_text().replace(
        '"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))  # another model, same path
    with pytest.raises(CompareError, match=r"differs in: inputs \(model "):
        run_comparison(runs, proto, tmp_path / "out", launcher=launcher, plot=False)


def test_results_recorded_before_inputs_were_fingerprinted_still_resume(tmp_path, fake):
    import json

    launcher, calls = fake
    runs = parse_method_specs("rtn-sign")
    run_comparison(runs, PROTOCOL, tmp_path, launcher=launcher, plot=False)
    results = json.loads((tmp_path / "results.json").read_text())
    del results["protocol"]["inputs"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    n = len(_calls(calls))
    run_comparison(runs, PROTOCOL, tmp_path, launcher=launcher, plot=False)
    assert len(_calls(calls)) == n  # nothing ran again


def test_an_out_inside_the_model_directory_is_refused(tmp_path, fake, shared):
    import shutil

    launcher, calls = fake
    model = tmp_path / "model"
    shutil.copytree(shared / "models" / "stories260K", model)
    proto = Protocol(str(model), calib="wikitext2", nsamples=4, seqlen=32, eval=("wikitext2",))
    for out in (model, model / "cmp"):
        with pytest.raises(CompareError, match="inside the model directory"):
            run_comparison(parse_method_specs("rtn-sign"), proto, out, launcher=launcher)
    assert not (model / "cmp").exists() and not _calls(calls)
