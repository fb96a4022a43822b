"""Decode speed at long contexts (SmolLM2-135M): tokens/s of binllm's lean decode loop after
prompts of several lengths, where each step's attention reads every cached position.

For each model (a binllm directory, or "dense" for the bf16 model) and each prompt length:
the first LENGTH tokens of wikitext2 test as the prompt (its forward untimed), then 32
single-token decode steps, timed as `bench_real_runtime.py` times decode; one thread unless
--threads. Models run one after the other in this process.

    python benchmarks/bench_decode_context.py MODEL [MODEL ...] [--lengths 128,1024,2048,4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import generation_speed, md_row, write_results  # noqa: E402
from bench_decode_rounds import load_model, tokens  # noqa: E402

STEPS = 32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--lengths", default="128,1024,2048,4096")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--stem", default="decode_context")
    args = ap.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    ids = tokens()
    if ids.shape[1] < max(lengths):
        raise SystemExit(f"wikitext2 test has {ids.shape[1]} tokens; ask for fewer")
    torch.set_num_threads(args.threads)
    rows = {}
    for path in args.models:
        model = load_model(path)
        rows[path] = {n: generation_speed(model, ids[:, :n], STEPS, repeats=args.repeats,
                                          loop="lean") for n in lengths}
        print(path, rows[path], flush=True)
        del model
    names = [Path(m).name for m in args.models]
    md = [f"# Decode tokens/s after long prompts (SmolLM2-135M, {args.threads} thread(s))", "",
          f"{STEPS} decode steps after a prompt of each length (its forward untimed); best of "
          f"{args.repeats}.", "", md_row("prompt tokens", *names),
          md_row(*["---"] * (len(names) + 1))]
    md += [md_row(n, *(f"{rows[m][n]:.1f}" for m in args.models)) for n in lengths]
    write_results(args.stem, {"threads": args.threads, "steps": STEPS, "lengths": lengths,
                              "tokens_per_s": {m: rows[m] for m in args.models}},
                  "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
