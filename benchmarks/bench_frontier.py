"""Issue 14 benchmark: quality per stored bit, on stories260K and on 7B-shaped synthetic layers.

stories260K: `binllm compare`'s machinery (`binllm.evaluation.compare`) runs every method spec
below on one protocol (calibration 128 × 512 tokens of wikitext2 validation, seed 0; perplexity
on tinystories, wikitext2, ptb, c4, first 100 windows each), each in its own process, resumable
in --runs-dir; the table, JSON and plot are copied to benchmarks/results/frontier_stories260K.*.

Layers: a random 4096 × 4096 weight (and 11008 × 4096 with --wide) against the synthetic
correlated Hessian of bench_methods; relative output error tr(E H Eᵀ) / tr(W H Wᵀ) against
stored bits per weight → benchmarks/results/frontier_layers.{json,md,png}.

    python benchmarks/bench_frontier.py [--stories-only | --layers-only] [--runs-dir DIR]
    python benchmarks/bench_frontier.py --seeds 0,1,2    # calibration-seed spread of SEED_SPECS
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # children too: idle threads sleep
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATASETS, OUT, ROOT, STORIES, write_results  # noqa: E402
from _common import layer_row, synthetic_hessian, synthetic_weight  # noqa: E402

SPECS = [  # the comparison, then the cheaper-metadata options, then the low-bit points
    "rtn-sign", "gptq:bits=2", "gptq:bits=3", "pbllm-10", "billm", "arb-llm-x", "arb-llm-rc",
    "billm:scale_codes=q8", "arb-llm-x:scale_codes=q8", "arb-llm-rc:scale_codes=q8",
    "billm:block=256", "arb-llm-rc:block=256", "arb-llm-rc:scale_codes=q8:block=256",
    "q1_0", "q1_0:column_scales=true", "block-sign", "block-sign:scale_codes=q8",
]


SEED_SPECS = ["billm", "arb-llm-rc", "billm:scale_codes=q8", "q1_0", "block-sign:scale_codes=q8"]


def protocol(seed: int = 0):
    from binllm.evaluation.compare import Protocol

    return Protocol(str(STORIES), calib="wikitext2", calib_split="validation", nsamples=128,
                    seqlen=512, seed=seed, eval=tuple(DATASETS), max_windows=100)


def stories(runs_dir: Path, specs: list[str]) -> dict:
    from binllm.evaluation.compare import parse_method_specs, run_comparison


    def show(ev):
        if ev.stage in ("done", "failed", "skipped"):
            r = ev.row or {}
            ppl = {k: round(v["ppl"], 2) for k, v in (r.get("perplexity") or {}).items()}
            bits = f", {r['stored_bits']:.3f} stored bits" if "stored_bits" in r else ""
            print(f"[{ev.index}/{ev.total}] {ev.label} {ev.stage}: {ppl or r.get('error')}{bits}",
                  flush=True)

    res = run_comparison(parse_method_specs(",".join(specs)), protocol(), runs_dir, progress=show)
    for name, dst in (("results.json", "frontier_stories260K.json"),
                      ("results.md", "frontier_stories260K.md"),
                      ("frontier.png", "frontier_stories260K.png")):
        if (runs_dir / name).exists():
            shutil.copyfile(runs_dir / name, OUT / dst)
    print(res.markdown_path.read_text())
    if res.plot_skipped:
        print("plot skipped:", res.plot_skipped)
    return res.results


def seed_spread(specs: list[str], seeds: list[int], runs_root: Path) -> str:
    """The same methods on other calibration samples (seeds): how much of a difference between
    two methods on stories260K is the luck of one calibration draw."""
    from binllm.evaluation.compare import parse_method_specs, run_comparison

    per = {}
    for seed in seeds:
        runs_dir = runs_root if seed == 0 else runs_root.with_name(f"{runs_root.name}_seed{seed}")
        res = run_comparison(parse_method_specs(",".join(specs)), protocol(seed), runs_dir,
                             fp=False, plot=False)
        for r in res.results["runs"]:
            if r["label"] not in specs:  # the seed-0 folder also holds the other methods
                continue
            per.setdefault(r["label"], {})[seed] = r
    lines = ["# stories260K: the calibration seed", "",
             "Same protocol as frontier_stories260K.md (128 × 512 tokens of wikitext2 validation, "
             "first 100 windows of each test split) with calibration seeds "
             + ", ".join(map(str, seeds)) + "; tinystories perplexity per seed, then the mean "
             "over seeds of each dataset.", "",
             "| method | stored bits | " + " | ".join(f"tinystories, seed {s}" for s in seeds)
             + " | " + " | ".join(f"{d} mean" for d in DATASETS) + " |",
             "|" + "---|" * (2 + len(seeds) + len(DATASETS))]
    for label, rows in per.items():
        ok = [rows[s] for s in seeds if rows.get(s, {}).get("status") == "ok"]
        if len(ok) < len(seeds):
            lines.append(f"| {label} | failed for some seed | |")
            continue
        mean = {d: sum(r["perplexity"][d]["ppl"] for r in ok) / len(ok) for d in DATASETS}
        lines.append(f"| {label} | {ok[0]['stored_bits']:.3f} | "
                     + " | ".join(f"{r['perplexity']['tinystories']['ppl']:.2f}" for r in ok)
                     + " | " + " | ".join(f"{mean[d]:.2f}" for d in DATASETS) + " |")
    text = "\n".join(lines) + "\n"
    write_results("frontier_seeds", per, text)
    return text


def layers(specs: list[str], shapes: list[tuple[int, int]]) -> list[dict]:
    from binllm.evaluation.compare import parse_method_spec
    from binllm.methods import get_method

    rows = []
    for out_f, in_f in shapes:
        H = synthetic_hessian(in_f)
        W = synthetic_weight(out_f, in_f)
        for spec in specs:
            run = parse_method_spec(spec)
            rows.append(layer_row(spec, W, H, get_method(run.method, dict(run.args))))
            print(f"{spec} {out_f}x{in_f}: error {rows[-1]['rel_output_error']:.4f}, "
                  f"{rows[-1]['stored_bits']:.3f} stored bits, {rows[-1]['seconds']:.1f} s",
                  flush=True)
    return rows


def layers_markdown(rows: list[dict]) -> str:
    lines = ["# Quality per stored bit on 7B-shaped layers", "",
             "Random W (σ = 0.02), synthetic correlated Hessian H = 2/n XᵀX (bench_methods), "
             "relative output error tr(E H Eᵀ) / tr(W H Wᵀ), E = W − Ŵ (lower is better); "
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads.", "",
             "| method | shape | output error | paper bits | stored bits | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['shape'][0]}×{r['shape'][1]} | "
                     f"{r['rel_output_error']:.4f} | {r['paper_bits']:.3f} | "
                     f"{r['stored_bits']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_layers(rows: list[dict]) -> None:
    from binllm.evaluation.plot import Panel, plot_panels

    shapes = sorted({tuple(r["shape"]) for r in rows})
    panels = [Panel(f"{o}×{i}", "relative output error (log)",
                    [(r["label"], r["stored_bits"], r["rel_output_error"]) for r in rows
                     if tuple(r["shape"]) == (o, i)]) for o, i in shapes]
    try:
        plot_panels(panels, OUT / "frontier_layers.png", "Output error per stored bit, "
                    "7B-shaped synthetic layers")
    except ImportError:
        print('plot skipped: matplotlib is not installed (pip install "binllm[plot]")')


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stories-only", action="store_true")
    ap.add_argument("--layers-only", action="store_true")
    ap.add_argument("--wide", action="store_true", help="also 11008×4096 layers")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "out" / "frontier_stories260K")
    ap.add_argument("--specs", default=None, help="comma-separated subset of method specs")
    ap.add_argument("--seeds", default=None, metavar="S1,S2",
                    help="only the calibration-seed table: SEED_SPECS at these seeds")
    args = ap.parse_args()
    specs = args.specs.split(",") if args.specs else SPECS
    OUT.mkdir(parents=True, exist_ok=True)
    if args.seeds:
        print(seed_spread(args.specs.split(",") if args.specs else SEED_SPECS,
                          [int(x) for x in args.seeds.split(",")], args.runs_dir))
        return
    if not args.layers_only:
        stories(args.runs_dir, specs)
    if not args.stories_only:
        shapes = [(4096, 4096)] + ([(11008, 4096)] if args.wide else [])
        rows = layers(specs, shapes)
        write_results("frontier_layers", {"torch": torch.__version__,
                                          "threads": torch.get_num_threads(), "rows": rows},
                      layers_markdown(rows))
        plot_layers(rows)
        print(layers_markdown(rows))


if __name__ == "__main__":
    main()
