"""Issue 3 benchmark: every paper method on stories260K, plus seconds per 7B-shaped linear.

Writes benchmarks/results/methods.json and methods.md. The stories260K rows are run by
`binllm compare`'s machinery (`binllm.evaluation.compare`): each method in its own process
(`binllm quantize … --report`), so that its peak memory is its own; `--runs-dir DIR` keeps
the comparison there so that an interrupted run resumes. Perplexities use every
window of each test split (no cap) unless --max-windows is given; the table says which.

    python benchmarks/bench_methods.py [--nsamples 128] [--max-windows N] [--skip-linear]
                                       [--runs-dir DIR]
                                       (--skip-linear keeps the per-linear rows of methods.json)
    python benchmarks/bench_methods.py --linear-only   # redo the per-linear rows, keep the rest

Per linear, besides the seconds, the table gives the relative output error on the synthetic
activations, tr(E H Eᵀ) / tr(W H Wᵀ) with E = W − Ŵ: the quantity every method minimises,
on 4096-wide layers where blocks of 128 columns and salient columns behave as in a 7B model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # children too: idle threads sleep
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATASETS, OUT, STORIES, write_results  # noqa: E402
from _common import layer_row, synthetic_hessian, synthetic_weight  # noqa: E402

RUNS = [  # (label, method, method args)
    ("rtn-sign", "rtn-sign", []),
    ("GPTQ 2-bit", "gptq", ["bits=2"]),
    ("PB-LLM 10%", "pbllm-10", []),
    ("BiLLM", "billm", []),
    ("ARB", "arb", []),
    ("ARB-X", "arb-x", []),
    ("ARB-RC", "arb-rc", []),
    ("ARB-LLM_X", "arb-llm-x", []),
    ("ARB-LLM_RC", "arb-llm-rc", []),
]
VARIANTS = [  # named options that depart from the reference code
    ("PB-LLM 10%, masked stats", "pbllm-10", ["stats=masked"]),
    ("BiLLM, search on W", "billm", ["search_target=weight"]),
    ("BiLLM, intra-block", "billm", ["intra_block=true"]),
    ("BiLLM, split on W magnitude", "billm", ["split_on=weight"]),
    ("ARB-LLM_RC, intra-block", "arb-llm-rc", ["intra_block=true"]),
]
LINEAR_SHAPES = [(4096, 4096), (11008, 4096)]
LINEAR_VARIANTS = [v for v in VARIANTS  # 4096×4096 only
                   if v[0] not in ("BiLLM, search on W", "BiLLM, split on W magnitude")]


def stories_rows(nsamples: int, max_windows: int | None, only: set[str] | None = None,
                 runs_dir: Path | None = None) -> list[dict]:
    """The stories260K rows, run by `binllm compare`'s machinery (one child per method, resumable
    in runs_dir: a rerun after a crash skips the methods that finished)."""
    from binllm.evaluation.compare import MethodRun, Protocol, run_comparison
    from binllm.methods import METHODS

    chosen = [(label, method, margs) for label, method, margs in RUNS + VARIANTS
              if only is None or label in only or method in only]
    runs = [MethodRun(label, method, tuple(tuple(a.split("=", 1)) for a in margs))
            for label, method, margs in chosen if method in METHODS]
    protocol = Protocol(str(STORIES), calib="wikitext2", calib_split="validation",
                        nsamples=nsamples, seqlen=512, eval=tuple(DATASETS),
                        max_windows=max_windows)

    def show(ev):
        if ev.stage in ("done", "failed"):
            ppl = {k: round(v["ppl"], 2) for k, v in (ev.row.get("perplexity") or {}).items()}
            print(f"{ev.label}: {ppl or ev.row.get('error')}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        res = run_comparison(runs, protocol, runs_dir or tmp, progress=show, plot=False)
    fp = res.results["fp"]["perplexity"]
    rows = [{"label": "FP32", "method": None, "perplexity": fp,
             "paper_bits": 32.0, "stored_bits": 32.0, "seconds": 0.0, "peak_memory_mb": None}]
    done = {r["label"]: r for r in res.results["runs"]}
    for label, method, _ in chosen:
        r = done.get(label)
        if r is None:
            rows.append({"label": label, "method": method, "missing": True})
        elif r["status"] != "ok":
            raise RuntimeError(f"{label} failed: {r['error']}")
        else:
            rows.append({"label": label, "method": method, "method_args": r["resolved_args"],
                         "perplexity": r["perplexity"], "paper_bits": r["paper_bits"],
                         "stored_bits": r["stored_bits"], "seconds": r["seconds"],
                         "peak_memory_mb": r["peak_memory_mb"], "protocol": r["calibration"]})
    return rows


def linear_rows() -> list[dict]:
    from binllm.methods import METHODS, get_method

    rows = []
    for out_f, in_f in LINEAR_SHAPES:
        H = synthetic_hessian(in_f)
        W = synthetic_weight(out_f, in_f)
        runs = RUNS + (LINEAR_VARIANTS if (out_f, in_f) == LINEAR_SHAPES[0] else [])
        for label, method, margs in runs:
            if method not in METHODS:
                continue
            rows.append(layer_row(label, W, H, get_method(method, dict(a.split("=", 1)
                                                                      for a in margs))))
            print(f"{label} {out_f}x{in_f}: {rows[-1]['seconds']:.1f} s, "
                  f"error {rows[-1]['rel_output_error']:.4f}", flush=True)
    return rows


def markdown(result: dict) -> str:
    cap = result["max_windows"]
    lines = [f"# Methods on stories260K (seqlen 512, calibration: {result['nsamples']} windows of "
             f"wikitext2 validation, seed 0)", "",
             "Perplexity on the test splits, "
             + ("all windows" if not cap else f"first {cap} windows")
             + f"; torch {result['torch']}, {result['threads']} CPU threads.", ""]
    head = ("| method | " + " | ".join(DATASETS)
            + " | paper bits | stored bits | quant s | peak MiB |")
    lines += [head, "|" + "---|" * (len(DATASETS) + 5)]
    for r in result["stories260K"]:
        if r.get("missing"):
            lines.append(f"| {r['label']} | "
                         + " | ".join("not registered" for _ in DATASETS) + " | | | | |")
            continue
        ppl = " | ".join(f"{r['perplexity'][d]['ppl']:.2f}" for d in DATASETS)
        mem = "" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['label']} | {ppl} | {r['paper_bits']:.3f} | {r['stored_bits']:.3f} "
                     f"| {r['seconds']:.1f} | {mem} |")
    windows = {d: result["stories260K"][0]["perplexity"][d]["windows"] for d in DATASETS}
    lines += ["", "Windows per dataset: " + ", ".join(f"{d} {n}" for d, n in windows.items()), ""]
    if result.get("linears"):
        lines += ["## Seconds per linear (random W, synthetic correlated Hessian, this CPU)", "",
                  "Output error: tr(E H Eᵀ) / tr(W H Wᵀ), E = W − Ŵ (lower is better).", "",
                  "| method | shape | seconds | output error | paper bits | stored bits |",
                  "|---|---|---|---|---|---|"]
        for r in result["linears"]:
            err = f"{r['rel_output_error']:.4f}" if "rel_output_error" in r else ""
            lines.append(f"| {r['label']} | {r['shape'][0]}×{r['shape'][1]} | {r['seconds']:.1f} "
                         f"| {err} | {r['paper_bits']:.3f} | {r['stored_bits']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--only", default=None, metavar="LABELS",
                    help="';'-separated row labels or method names to recompute on stories260K "
                         "(kept: the rest)")
    ap.add_argument("--linear-only", action="store_true",
                    help="recompute the per-linear rows; keep the stories260K rows of methods.json")
    ap.add_argument("--runs-dir", type=Path, default=None,
                    help="keep the per-method comparison here (resumable; default: a temp dir)")
    args = ap.parse_args()
    if args.only:  # recompute these stories260K rows, keep everything else
        result = json.loads((OUT / "methods.json").read_text())
        new = {r["label"]: r for r in stories_rows(args.nsamples, args.max_windows,
                                                    set(args.only.split(";")),
                                                    args.runs_dir)[1:]}
        old_rows = result["stories260K"]
        result["stories260K"] = [new.pop(r["label"], r) for r in old_rows] + list(new.values())
        args.skip_linear = True
    elif args.linear_only:
        result = json.loads((OUT / "methods.json").read_text())
    else:
        result = {"nsamples": args.nsamples, "max_windows": args.max_windows,
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "stories260K": stories_rows(args.nsamples, args.max_windows,
                                                 runs_dir=args.runs_dir)}
        if args.skip_linear and (OUT / "methods.json").exists():  # keep the per-linear rows
            old = json.loads((OUT / "methods.json").read_text()).get("linears")
            if old:
                result["linears"] = old
    if not args.skip_linear:
        result["linears"] = linear_rows()
    write_results("methods", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
