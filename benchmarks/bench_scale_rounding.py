"""Issue 13 benchmark: what rounding the scales to fp16 costs, after the loop or inside it.

For every method of bench_methods.RUNS, on stories260K with bench_methods' protocol, three
`binllm quantize` runs (each in its own process):

    float32   --method-arg scale_dtype=float32: fp32 scales in the loop and on disk, never
              rounded (the reference implementations' calibration)
    default   scale_rounding=after: the same calibration, scales rounded to fp16 once per
              layer after its loop; the model that is evaluated and saved
    in_loop   --method-arg scale_rounding=in_loop: rounded before Ŵ and the error feedback
              (the in_loop option)

and the relative perplexity difference of default and in_loop against float32. Writes
benchmarks/results/scale_rounding.json and .md.

    python benchmarks/bench_scale_rounding.py [--nsamples 128] [--max-windows 100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATASETS, ROOT, STORIES, write_results  # noqa: E402
from bench_methods import RUNS  # noqa: E402


def quantize_args(method: str, margs: list[str], nsamples: int, max_windows: int | None,
                  ) -> list[str]:
    """`binllm quantize` arguments of bench_methods' stories260K protocol (seqlen 512,
    wikitext2 validation calibration, perplexity on DATASETS)."""
    args = ["quantize", str(STORIES), "--method", method, "--calib", "wikitext2",
            "--calib-split", "validation", "--nsamples", str(nsamples), "--seqlen", "512",
            "--eval", ",".join(DATASETS)]
    if max_windows:
        args += ["--max-windows", str(max_windows)]
    for a in margs:
        args += ["--method-arg", a]
    return args


def run_cli(args: list[str]) -> dict:
    """One `binllm` command in its own process; its JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "binllm", "-q", *args, "--report", str(report)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        return json.loads(report.read_text())

MODES = [("float32", ["scale_dtype=float32"]), ("default", []),
         ("in_loop", ["scale_rounding=in_loop"])]


def rows(nsamples: int, max_windows: int | None) -> list[dict]:
    out = []
    for label, method, margs in RUNS:
        row = {"label": label, "method": method, "method_args": margs}
        for mode, extra in MODES:
            r = run_cli(quantize_args(method, margs + extra, nsamples, max_windows))
            q = r["quantization"]
            row[mode] = {"perplexity": {d: r["perplexity"][d]["ppl"] for d in DATASETS},
                         "windows": {d: r["perplexity"][d]["windows"] for d in DATASETS},
                         "stored_bits": q["stored_bits"], "method_args": q["method_args"],
                         "loss": sum(x["loss"] for x in q["linears"]),
                         "calibration_loss": sum(x["calibration_loss"] for x in q["linears"])}
        for mode in ("default", "in_loop"):
            row[f"{mode}_vs_float32_pct"] = {
                d: 100 * (row[mode]["perplexity"][d] / row["float32"]["perplexity"][d] - 1)
                for d in DATASETS}
        print(label, {m: {d: round(v, 4) for d, v in row[f"{m}_vs_float32_pct"].items()}
                      for m in ("default", "in_loop")}, flush=True)
        out.append(row)
    return out


def markdown(result: dict) -> str:
    cap = result["max_windows"]
    lines = ["# fp16 scales: rounded once after each layer (default) or inside the loop",
             "", f"stories260K, seqlen 512, calibration {result['nsamples']} windows of wikitext2 "
             "validation (seed 0), perplexity on the "
             + ("full test splits" if not cap else f"first {cap} windows of each test split")
             + f"; torch {result['torch']}, {result['threads']} CPU threads. `float32`: "
             "`scale_dtype=float32`, scales never rounded (the references' calibration); "
             "`default`: the same calibration, scales stored in fp16 (rounded once per layer, "
             "after its loop); `in_loop`: `scale_rounding=in_loop`, rounded before Ŵ and the "
             "error feedback (the in_loop option). Δ: perplexity relative to float32.",
             "", "| method | " + " | ".join(f"{d} float32" for d in DATASETS)
             + " | Δ default (max \\|Δ\\| over the 4) | Δ in_loop " + " / ".join(DATASETS) + " |",
             "|" + "---|" * (len(DATASETS) + 3)]
    for r in result["rows"]:
        fp = " | ".join(f"{r['float32']['perplexity'][d]:.3f}" for d in DATASETS)
        dd = max(abs(v) for v in r["default_vs_float32_pct"].values())
        di = " / ".join(f"{r['in_loop_vs_float32_pct'][d]:+.1f} %" for d in DATASETS)
        lines.append(f"| {r['label']} | {fp} | {dd:.4f} % | {di} |")
    lines += ["", "Per dataset, default vs float32 (%):", "",
              "| method | " + " | ".join(DATASETS) + " |", "|" + "---|" * (len(DATASETS) + 1)]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | " + " | ".join(
            f"{r['default_vs_float32_pct'][d]:+.4f}" for d in DATASETS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=100)
    args = ap.parse_args()
    result = {"nsamples": args.nsamples, "max_windows": args.max_windows,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rows": rows(args.nsamples, args.max_windows)}
    write_results("scale_rounding", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
