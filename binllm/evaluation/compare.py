"""Compare methods on one protocol: each in its own process, resumable, a table and a plot.

    runs = parse_method_specs("billm,gptq:bits=2,arb-llm-rc:intra_block=true")
    result = run_comparison(runs, Protocol("../shared/models/stories260K", calib="wikitext2",
                                           calib_split="validation", seqlen=512,
                                           eval=("tinystories", "wikitext2")), "out/cmp")

Every method runs as `python -m binllm quantize MODEL --method NAME --method-arg K=V …
--report FILE` with the same calibration (dataset, split, nsamples, seqlen, seed: the same
windows) and the same evaluation streams, so a crash or an out-of-memory kill loses that
method only. After each one `DIR/results.json` is rewritten atomically; a second run on the
same DIR and the same protocol skips the methods that finished (failed ones run again), and
a different protocol is refused (`fresh=True` starts over). The full-precision model is
evaluated once the same way (`binllm eval`). `DIR/results.md` is the table and
`DIR/frontier.png` the plot (perplexity, log scale, against stored bits per weight), drawn with
matplotlib when it is installed (`pip install "binllm[plot]"`).

A method spec is `name[:key=value[:key=value…]]`; its label is the spec itself. The keys
`refine`, `distill`, `rotate`, `embeddings`, `lm_head`, `feedback` and `<stage>_<setting>`
(`refine_epochs=4`, `distill_lr=2e-3`) go to the engine (`--refine`, `--distill`, `--rotate`,
`--embeddings`, `--lm-head`, `--feedback`, `--refine-arg`, `--distill-arg`) rather than
to the method, so one table holds a method with and
without them: `q1_0,q1_0:refine=block,q1_0:rotate=hadamard:refine=block`. Imports only
`binllm.atomic` of binllm (the methods run in child processes).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write, write_json_atomic
from .compare_spec import (ENGINE_KEYS, CompareError, MethodRun, Protocol,  # noqa: F401
                           parse_method_spec, parse_method_specs)

RESULTS_VERSION = 1
DEFAULT_LAUNCHER = (sys.executable, "-m", "binllm")
_TQDM = re.compile(r"^\s*(?P<desc>[^:|]+):\s+(?:\d+%\|[^|]*\|\s*)?(?P<k>\d+)/(?P<n>\d+)")


# -- running -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """What the runner reports: method `index` of `total` (0 = the FP model), its stage
    ("start", "layers", "ppl NAME", "done", "failed", "skipped") and k of n within the stage."""

    index: int
    total: int
    label: str
    stage: str
    done: int | None = None
    of: int | None = None
    row: dict[str, Any] | None = None


@dataclass
class ComparisonResult:
    """Paths written and the rows of results.json; `plot_skipped` says why there is no plot."""

    results: dict[str, Any]
    results_path: Path
    markdown_path: Path
    plot_path: Path | None = None
    plot_skipped: str | None = None
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def run_child(argv: list[str], log_path: Path, on_line: Callable[[str, int, int], None],
              timeout: float | None = None, launcher: list[str] | None = None) -> tuple[int, str]:
    """Run `launcher + argv` in a child, by default `python -m binllm argv`; (return code,
    one-line error or "").

    Its stderr goes to `log_path`; tqdm lines ("desc: … k/n") call on_line(desc, k, n).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*(launcher or DEFAULT_LAUNCHER), *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env)
        buf, last = b"", ""
        timed_out = False
        fd = proc.stderr.fileno()
        while True:
            if select.select([fd], [], [], 0.2)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:  # EOF: the child closed stderr (it exited)
                    break
                log.write(chunk)
                buf += chunk
                *parts, buf = re.split(rb"[\r\n]", buf)
                for raw in parts:
                    line = raw.decode("utf-8", "replace")
                    if line.strip():
                        last = line
                    if m := _TQDM.match(line):
                        on_line(m["desc"].strip(), int(m["k"]), int(m["n"]))
            if timeout is not None and time.monotonic() - t0 > timeout and proc.poll() is None:
                proc.kill()
                timed_out = True
        rc = proc.wait()
    tail = log_path.read_text("utf-8", "replace").splitlines()
    errors = [x for x in tail if "binllm: error:" in x]
    if timed_out:
        return rc, f"timed out after {timeout:.0f} s"
    if rc == 0:
        return 0, ""
    if rc < 0:
        return rc, f"killed by signal {-rc}" + (" (out of memory?)" if -rc == 9 else "")
    return rc, (errors[-1].split("binllm: error:", 1)[1].strip() if errors else
                (buf.decode("utf-8", "replace").strip() or last).strip()[-300:])


def _load(path: Path, protocol: Protocol, fresh: bool) -> dict[str, Any]:
    new = {"version": RESULTS_VERSION, "protocol": protocol.identity(), "fp": None, "runs": []}
    if fresh or not path.exists():
        return new
    try:
        old = json.loads(path.read_text())
    except (ValueError, IsADirectoryError):  # not JSON, not UTF-8, a folder
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("runs"), list):
        raise CompareError(f"{path} is not a results file of `binllm compare`; choose another "
                           "out_dir=, or pass fresh=True to replace it") from None
    was, now = dict(old.get("protocol") or {}), new["protocol"]
    was.setdefault("inputs", now["inputs"])  # results from before inputs were recorded
    if was != now:
        diff = sorted(k for k in set(now) | set(was) if was.get(k) != now.get(k))
        if "inputs" in diff:  # name what changed: the model, or which data file
            diff.remove("inputs")
            diff += [f"inputs ({k})" for k in _changed(was["inputs"], now["inputs"])]
        raise CompareError(f"{path} holds results of another protocol (differs in: "
                           f"{', '.join(diff)}); pass fresh=True to start over there, "
                           "or choose another out_dir=")
    old["protocol"] = now
    return old


def _changed(was: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The model and the "dataset:split" entries whose fingerprints differ."""
    out = ["model " + (now["model"].get("path") or now["model"].get("hub", ""))
           ] if was.get("model") != now.get("model") else []
    wd, nd = was.get("data") or {}, now.get("data") or {}
    return out + [f"data {k}" for k in sorted(set(wd) | set(nd)) if wd.get(k) != nd.get(k)]


def run_comparison(runs: list[MethodRun], protocol: Protocol, out_dir: str | os.PathLike, *,
                   fresh: bool = False, fp: bool = True, timeout: float | None = None,
                   progress: Callable[[Progress], None] | None = None,
                   plot: bool = True, launcher: list[str] | None = None) -> ComparisonResult:
    """Run every method of `runs` (and the FP model) on `protocol`; write DIR's three files.

    `progress` gets a `Progress` event per stage; `launcher` replaces `python -m binllm`.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CompareError(f"out_dir={out} is a file, not a folder; name a folder (it is created "
                           "if missing)")
    model = Path(protocol.model)
    if model.is_dir() and (out.resolve() == model.resolve()
                           or model.resolve() in out.resolve().parents):
        raise CompareError(f"out_dir={out} is inside the model directory {model}; a comparison "
                           "never writes there: choose a folder outside it")
    path = out / "results.json"
    results = _load(path, protocol, fresh)
    try:
        (out / "reports").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompareError(f"out_dir={out}: cannot create it ({e.strerror or e}); name a folder "
                           "in a writable place") from None
    report = lambda *a, **k: progress and progress(Progress(*a, **k))  # noqa: E731
    done = {r["label"]: r for r in results["runs"]}
    ran, skipped = [], []
    n = len(runs)
    if fp and not (results.get("fp") or {}).get("perplexity"):
        report(0, n, "FP", "start")
        rep = out / "reports" / "fp.json"
        rc, err = run_child(protocol.eval_argv(rep), out / "logs" / "fp.log",
                            lambda d, k, m: d.startswith("ppl ") and report(0, n, "FP", d, k, m),
                            timeout, launcher)
        ok = rc == 0 and rep.is_file()
        results["fp"] = ({"perplexity": _ppl(json.loads(rep.read_text())["perplexity"])}
                         if ok else {"error": err or f"no report written to {rep}"})
        write_json_atomic(path, results)
        report(0, n, "FP", "done" if ok else "failed", row=results["fp"])
    for i, run in enumerate(runs, 1):
        old = done.get(run.label)
        if old and old.get("status") == "ok" and {k: old.get(k) for k in run.key()} == run.key():
            skipped.append(run.label)
            report(i, n, run.label, "skipped", row=old)
            continue
        report(i, n, run.label, "start")
        rep = out / "reports" / f"{_slug(run.label)}.json"
        rep.unlink(missing_ok=True)
        t0 = time.perf_counter()
        log_path = out / "logs" / f"{_slug(run.label)}.log"
        rc, err = run_child(protocol.quantize_argv(run, rep), log_path,
                            lambda d, k, m, i=i, run=run: _child_line(
                                report, i, n, run, d, k, m), timeout, launcher)
        row = {"label": run.label, **run.key(), "status": "ok" if rc == 0 else "failed",
               "wall_seconds": time.perf_counter() - t0}
        if rc == 0 and not rep.is_file():
            rc, err = -1, f"the child exited without writing {rep}"
        row["status"] = "ok" if rc == 0 else "failed"
        if rc == 0:
            row.update(_row_from_report(json.loads(rep.read_text())))
        else:
            row.update(error=err, returncode=rc)
        done[run.label] = row
        order = [r.label for r in runs]
        results["runs"] = [done[x] for x in order if x in done] + [
            r for x, r in done.items() if x not in order]
        write_json_atomic(path, results)
        ran.append(run.label)
        report(i, n, run.label, "done" if rc == 0 else "failed", row=row)
    md = out / "results.md"
    atomic_write(md, lambda tmp: tmp.write_text(markdown(results)))
    res = ComparisonResult(results, path, md, ran=ran, skipped=skipped)
    if plot:
        try:
            from .plot import plot_frontier

            res.plot_path = plot_frontier(results, out / "frontier.png")
        except ImportError:
            res.plot_skipped = ('matplotlib is not installed (pip install "binllm[plot]"); '
                                "frontier.png was not drawn")
    return res


def _child_line(report, i: int, n: int, run: MethodRun, desc: str, k: int, m: int) -> None:
    """Forward the child's layer bar (desc = method name) and perplexity bars ("ppl NAME")."""
    if desc == run.method:
        report(i, n, run.label, "layers", k, m)
    elif desc.startswith("ppl "):
        report(i, n, run.label, desc, k, m)


def _ppl(p: dict[str, Any]) -> dict[str, Any]:
    return {d: {k: v[k] for k in ("ppl", "windows", "total_windows")} for d, v in p.items()}


def _row_from_report(r: dict[str, Any]) -> dict[str, Any]:
    q = r["quantization"]
    return {"resolved_args": q["method_args"], "perplexity": _ppl(r.get("perplexity", {})),
            "paper_bits": q["paper_bits"], "stored_bits": q["stored_bits"],
            "seconds": q["seconds"], "peak_memory_mb": q["peak_memory_mb"],
            "calibration": r["protocol"]}


# -- table and plot ------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    """results.md: perplexity per dataset, paper and stored bits, seconds, peak memory."""
    p = results["protocol"]
    ds = p["eval"]
    windows = "all windows" if not p["max_windows"] else f"first {p['max_windows']} windows"
    lines = [f"# Comparison on {p['model']}", "",
             f"Calibration: {p['nsamples']} × {p['seqlen'] or 'default'} tokens of {p['calib']} "
             f"{p['calib_split']} (seed {p['seed']}); perplexity on the {p['eval_split']} split "
             f"({windows}); block size {p['block_size']}, percdamp {p['percdamp']}. "
             "Stored bits count every tensor the packed format keeps.", "",
             "| method | " + " | ".join(ds) + " | paper bits | stored bits | quant s | peak MiB |",
             "|" + "---|" * (len(ds) + 5)]
    fp = (results.get("fp") or {}).get("perplexity")
    if fp:
        lines.append("| FP | " + " | ".join(_cell(fp, d) for d in ds) + " | | | | |")
    for r in results["runs"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | failed: {r.get('error', '?')} |"
                         + " |" * (len(ds) + 3))
            continue
        mem = "" if r.get("peak_memory_mb") is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['label']} | " + " | ".join(_cell(r["perplexity"], d) for d in ds)
                     + f" | {r['paper_bits']:.3f} | {r['stored_bits']:.3f} | "
                     f"{r['seconds']:.1f} | {mem} |")
    src = fp or next((r["perplexity"] for r in results["runs"] if r.get("status") == "ok"), {})
    if src:
        lines += ["", "Windows per dataset: " + ", ".join(
            f"{d} {src[d]['windows']}/{src[d]['total_windows']}" for d in ds if d in src)]
    return "\n".join(lines) + "\n"


def _cell(ppl: dict[str, Any], d: str) -> str:
    return f"{ppl[d]['ppl']:.2f}" if d in ppl else ""
