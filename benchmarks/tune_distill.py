"""Distillation settings tried on a saved packed model, without quantizing it again.

Loads a binllm directory (e.g. `binllm quantize SmolLM2 --method q1_0 --rotate hadamard
--refine block --out DIR` with the bench_real protocol), takes the FP model's top-k on the
protocol's calibration windows (32 × 2048 tokens of wikitext2 validation, seed 0) or on text
sampled from it (`data=sampled`), runs
`binllm.engine.distill.distill_codes` with the given settings on the packed model's codes,
and prints the report and the perplexities (wikitext2, c4 test, first 40 windows). This is
how the `--distill` defaults in docs/methods.md were chosen; the result is what
`--distill logits` with those settings gives after the same layer loop.

    python benchmarks/tune_distill.py DIR [--fp MODEL] [epochs=2 lr=5e-3 ...] [--base]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA  # noqa: E402
from bench_real import MODEL  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402


def dense_copy(model: nn.Module) -> dict:
    """Every BinaryLinear of `model` replaced by an nn.Linear holding its Ŵ (the model's
    dtype); returns name -> codes."""
    from binllm.packed.layers import BinaryLinear, set_submodule

    codes = {}
    dtype = model.get_input_embeddings().weight.dtype
    for name, mod in list(model.named_modules()):
        if isinstance(mod, BinaryLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            codes[name] = mod.codes()
            lin.weight.data = codes[name].dequantize()
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.clone()
            set_submodule(model, name, lin.to(dtype))
    return codes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("saved", type=Path)
    ap.add_argument("settings", nargs="*", help="DistillConfig fields, KEY=VALUE")
    ap.add_argument("--fp", type=Path, default=MODEL)
    ap.add_argument("--base", action="store_true", help="also evaluate before distilling")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import binllm
    from binllm.engine.config import DistillConfig
    from binllm.engine.distill import distill_codes, distill_windows, teacher_targets
    from binllm.evaluation.data import calibration_batches, eval_tokens, load_text
    from binllm.evaluation.perplexity import perplexity

    types = {f.name: f.type for f in dataclasses.fields(DistillConfig)}
    config = DistillConfig(**{k: (v if types[k] in (str, "str") else
                                  int(v) if types[k] in (int, "int") else float(v))
                              for k, v in (s.split("=", 1) for s in args.settings)})
    tok = AutoTokenizer.from_pretrained(args.fp)
    calib = calibration_batches(load_text("wikitext2", "validation", DATA), tok, 32, 2048, 0)
    fp = AutoModelForCausalLM.from_pretrained(args.fp, dtype=torch.bfloat16)
    windows = distill_windows(fp, calib, config)
    targets = teacher_targets(fp, windows, config.topk)
    del fp
    model = binllm.load(args.saved, kernels=False)
    codes = dense_copy(model)

    def ppl() -> dict:
        return {ds: round(perplexity(model, eval_tokens(load_text(ds, "test", DATA), tok, 2048),
                                     2048, max_windows=40).ppl, 2) for ds in ("wikitext2", "c4")}

    out = {"saved": str(args.saved), "config": dataclasses.asdict(config)}
    if args.base:
        out["before"] = ppl()
    t0 = time.perf_counter()
    _, report = distill_codes(model, codes, windows, targets, config)
    out.update(distill=dataclasses.asdict(report), seconds=time.perf_counter() - t0,
               after=ppl())
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
