"""Quality per stored bit on a real model: SmolLM2-135M-Instruct, plain, refined, rotated,
distilled.

The protocol of the refinement issue: calibration 32 × 2048 tokens of wikitext2 validation
(seed 0), perplexity on wikitext2 and c4 test, first 40 windows of 2048 tokens each. Every
spec runs through `binllm compare`'s machinery (`binllm.evaluation.compare`), each in its own
process, resumable in --runs-dir; the table, JSON and frontier plot are copied to
benchmarks/results/real_smollm2.{json,md,png}.

The model's Hugging Face directory is built on first use from the GGUF in
../shared/models/smollm2-135m (make_hf.py; needs `pip install gguf accelerate`).

    python benchmarks/bench_real.py [--specs q1_0,q1_0:refine=block] [--runs-dir DIR] [--no-fp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, OUT, SHARED  # noqa: E402

MAKE_HF = SHARED / "models" / "smollm2-135m" / "make_hf.py"
MODEL = Path.home() / ".cache" / "binllm" / "smollm2-135m"
# each method plain, refined, rotated, both, and both then distilled; the 1-bit layouts first
SPECS = [f"{m}{suffix}" for m in ("q1_0", "block-sign", "arb-llm-rc", "arb-llm-x", "billm",
                                  "pbllm-10", "rtn-sign")
         for suffix in ("", ":refine=block", ":rotate=hadamard", ":rotate=hadamard:refine=block",
                        ":rotate=hadamard:refine=block:distill=logits")]
# the best 1-bit configuration: distillation on the calibration and on text sampled from the FP
# model (docs/methods.md, "--distill logits")
SPECS += ["q1_0:rotate=hadamard:refine=block:distill=logits:distill_data=both"]
# below one bit: binary-factor at each stored-bits budget, its initialisation, refined, and
# refined after the column-feedback refit of its right factor; at 0.8 and 1.25 bits also
# distilled on the calibration and sampled text
SPECS += [f"binary-factor:bits={b}{suffix}" for b in ("0.55", "0.8", "1.0", "1.25")
          for suffix in ("", ":refine=block", ":feedback=column:refine=block")]
SPECS += [f"binary-factor:bits={b}:feedback=column:refine=block:distill=logits:distill_data=both"
          for b in ("0.8", "1.25")]


def model_dir(path: Path) -> Path:
    """The HF directory of SmolLM2-135M, built from the shared GGUF when missing."""
    if not (path / "config.json").is_file():
        subprocess.run([sys.executable, str(MAKE_HF), str(path)], check=True)
    return path


def protocol(model: Path):
    from binllm.evaluation.compare import Protocol

    return Protocol(str(model), calib="wikitext2", calib_split="validation", nsamples=32,
                    seqlen=2048, seed=0, eval=("wikitext2", "c4"), max_windows=40,
                    data_dir=str(DATA))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--runs-dir", type=Path, default=Path.home() / ".cache/binllm/bench_real")
    ap.add_argument("--no-fp", action="store_true", help="skip the full-precision evaluation")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the children: idle threads sleep
    from binllm.evaluation.compare import parse_method_specs, run_comparison

    def show(ev):
        if ev.stage in ("start", "done", "failed", "skipped"):
            r = ev.row or {}
            ppl = {k: round(v["ppl"], 2) for k, v in (r.get("perplexity") or {}).items()}
            bits = f", {r['stored_bits']:.3f} stored bits" if "stored_bits" in r else ""
            secs = f", {r['seconds']:.0f} s" if "seconds" in r else ""
            print(f"[{ev.index}/{ev.total}] {ev.label} {ev.stage}: "
                  f"{ppl or r.get('error') or ''}{bits}{secs}", flush=True)

    res = run_comparison(parse_method_specs(args.specs), protocol(model_dir(args.model)),
                         args.runs_dir, fp=not args.no_fp, progress=show)
    for name, dst in (("results.json", "real_smollm2.json"), ("results.md", "real_smollm2.md"),
                      ("frontier.png", "real_smollm2.png")):
        if (args.runs_dir / name).exists():
            shutil.copyfile(args.runs_dir / name, OUT / dst)
    print(res.markdown_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
