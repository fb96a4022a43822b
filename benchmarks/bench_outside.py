"""What quantizing the embeddings and lm_head costs, alone: SmolLM2-135M with its decoder
layers in bf16 and only the table (tied: one table) quantized by `--embeddings/--lm-head`.

For each option pair: wikitext2 and c4 perplexity (first `--windows` windows of 2048, the
benchmark protocol) and the whole model's stored bits per parameter if the decoder linears
were at q1_0's 1.135 bits. Writes benchmarks/results/real_outside.{json,md}.

    python benchmarks/bench_outside.py [--windows 40] [--options keep:keep,q8:q8,q4:q4]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, md_row, write_results  # noqa: E402
from bench_real import MODEL, model_dir  # noqa: E402

import torch  # noqa: E402

Q1_0_BITS = 1.135  # stored bits per weight of SmolLM2's decoder linears at q1_0 (bench_real)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--options", default="keep:keep,q8:q8,q4:q4,keep:q4")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from binllm.engine.outside import quantize_outside
    from binllm.engine.walker import find_decoder_layers, find_linears
    from binllm.evaluation.data import eval_tokens, load_text
    from binllm.evaluation.perplexity import perplexity

    path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    tokens = {d: eval_tokens(load_text(d, "test", DATA), tok, 2048) for d in ("wikitext2", "c4")}
    rows = []
    for pair in args.options.split(","):
        emb, head = pair.split(":")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        params = sum(p.numel() for p in model.parameters())  # tied: counted once
        linear = sum(m.weight.numel() for layer in find_decoder_layers(model)[1]
                     for m in find_linears(layer).values())
        report = quantize_outside(model, emb, head)
        outside_bits = sum(report.stored_bits.values()) if report else 0
        rest = sum(p.numel() for p in model.parameters()) - linear  # kept tensors, bf16
        whole = (linear * Q1_0_BITS + outside_bits + rest * 16) / params
        row = {"embeddings": emb, "lm_head": head, "tied": bool(report and report.tied),
               "whole_bits_at_q1_0": whole}
        for d, t in tokens.items():
            row[d] = perplexity(model, t, 2048, max_windows=args.windows).ppl
        rows.append(row)
        print(row, flush=True)
    md = ["# SmolLM2-135M: cost of quantizing the embeddings / lm_head (layers in bf16)", "",
          f"Perplexity on the first {args.windows} windows of 2048; whole-model stored bits "
          f"per parameter with the decoder linears at q1_0 ({Q1_0_BITS} bits).", "",
          md_row("embeddings", "lm_head", "one table", "wikitext2", "c4",
                 "whole-model bits at q1_0"), md_row(*["---"] * 6)]
    md += [md_row(r["embeddings"], r["lm_head"], "yes" if r["tied"] else "no",
                  f"{r['wikitext2']:.2f}", f"{r['c4']:.2f}", f"{r['whole_bits_at_q1_0']:.3f}")
           for r in rows]
    write_results("real_outside", {"rows": rows, "windows": args.windows}, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
