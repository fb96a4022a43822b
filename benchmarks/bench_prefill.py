"""Prompt processing (prefill) of packed layers on the CPU: the fp32 and the bf16 dense-rebuild
paths of `binllm.kernels.cpu` against a dense bf16 F.linear; and a decode token's call.

The linears of one SmolLM2-135M decoder layer (q/o 576×576, k/v 192×576, gate/up 1536×576,
down 576×1536), N prompt tokens at once (default 512), `--threads` threads (default 1). The
packed codes are synthesised with `--method`'s layout (`bench_packed.layout_codes`, default
q1_0); each shape is timed as the best call over `--repeats` interleaved rounds of

- dense bf16: F.linear(x, W) with x, W bf16 (AMX where the CPU has it);
- dense fp32: F.linear(x, W) with x, W fp32 (the faster dense path on a CPU without bf16
  instructions);
- packed fp32: `form_matmul(form, x.float())`, rows rebuilt in fp32 (`bitpart_dense`) and an
  fp32 GEMM, the path of an fp32 model (and of a bf16 one before the bf16 path);
- packed bf16: `form_matmul(form, x)` with x bf16, rows rebuilt in bf16
  (`bitpart_dense_bf16`) and a bf16 GEMM, or the fp32 GEMM on the same values where the CPU
  has no bf16 instructions (`binllm.kernels.cpu.fast_bf16_matmul`, recorded in the header).

The layer's time is the sum over its 7 linears; tokens/s = N / that time (linears only).

A second table times one decode token (x (1, 1, cols) bf16) per call, as the best mean over
`--repeats` interleaved rounds of `--calls` calls: dense bf16 F.linear; the packed
BinaryLinear's forward (held in bf16), which calls its bound decoder (one compiled
`form_gemv` call); and `form_linear`, the registry's per-call path (dispatch, x.float(), the
parts' calls, .to(bf16)), which every decode call took before the decoder.

    OMP_NUM_THREADS=1 python benchmarks/bench_prefill.py [--tokens 512] [--repeats 3] [--stem S]
Writes benchmarks/results/prefill.json and prefill.md (S.json and S.md with --stem).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, md_row, write_results  # noqa: E402
from bench_kernels import like_codes  # noqa: E402
from bench_packed import layout_codes  # noqa: E402

# (rows, cols) of each linear of one SmolLM2-135M decoder layer
LAYER = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576),
         "o_proj": (576, 576), "gate_proj": (1536, 576), "up_proj": (1536, 576),
         "down_proj": (576, 1536)}
PATHS = ("dense bf16", "dense fp32", "packed fp32", "packed bf16")
DECODE_PATHS = ("dense bf16", "BinaryLinear", "form_linear")


def _best(fn, best: float) -> float:
    t = time.perf_counter()
    fn()
    return min(best, time.perf_counter() - t)


def measure(method: str, tokens: int, repeats: int) -> dict:
    """Best seconds per call of each path on each distinct shape, and the layer's totals."""
    from binllm.kernels import cpu
    from binllm.kernels.form import kernel_form

    like = like_codes(method)
    g = torch.Generator().manual_seed(1)
    calls = {}
    for rows, cols in sorted(set(LAYER.values())):
        codes = layout_codes(like, rows, cols, like.shape[1], g)
        form, W = kernel_form(codes), codes.dequantize().to(torch.bfloat16)
        x = torch.randn(tokens, cols, generator=g).to(torch.bfloat16)
        xf = x.float()
        calls[(rows, cols)] = {"dense bf16": lambda x=x, W=W: F.linear(x, W),
                               "dense fp32": lambda x=xf, W=W.float(): F.linear(x, W),
                               "packed fp32": lambda f=form, x=xf: cpu.form_matmul(f, x),
                               "packed bf16": lambda f=form, x=x: cpu.form_matmul(f, x)}
    best = {shape: dict.fromkeys(PATHS, float("inf")) for shape in calls}
    for fns in calls.values():  # warm-up: the extension's build, oneDNN's kernels
        for fn in fns.values():
            fn()
    for _ in range(repeats):  # rounds interleave the paths (a shared CPU's load changes)
        for shape, fns in calls.items():
            for path, fn in fns.items():
                best[shape][path] = _best(fn, best[shape][path])
    layer = {p: sum(best[shape][p] for shape in LAYER.values()) for p in PATHS}
    return {"shapes": [{"rows": r, "cols": c, **{p: best[(r, c)][p] for p in PATHS}}
                       for r, c in best],
            "layer_s": layer, "layer_tok_s": {p: tokens / layer[p] for p in PATHS}}


def measure_decode(method: str, calls: int, repeats: int) -> dict:
    """Best µs per call at one bf16 token of each decode path on each distinct shape (the best
    mean over `calls` calls), and the layer's totals."""
    from binllm.kernels import form_linear
    from binllm.packed.layers import BinaryLinear

    like = like_codes(method)
    g = torch.Generator().manual_seed(1)
    fns = {}
    for rows, cols in sorted(set(LAYER.values())):
        codes = layout_codes(like, rows, cols, like.shape[1], g)
        layer = BinaryLinear.from_codes(codes).to(torch.bfloat16)
        W = codes.dequantize().to(torch.bfloat16)
        x = torch.randn(1, 1, cols, generator=g).to(torch.bfloat16)
        fns[(rows, cols)] = {"dense bf16": lambda x=x, W=W: F.linear(x, W),
                             "BinaryLinear": lambda m=layer, x=x: m(x),
                             "form_linear": lambda m=layer, x=x: form_linear(m.kernel_form(), x)}
    best = {shape: dict.fromkeys(DECODE_PATHS, float("inf")) for shape in fns}
    with torch.no_grad():
        for paths in fns.values():  # warm-up: the form, the decoder's binding
            for fn in paths.values():
                fn()
        for _ in range(repeats):
            for shape, paths in fns.items():
                for path, fn in paths.items():
                    t = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    best[shape][path] = min(best[shape][path],
                                            (time.perf_counter() - t) / calls)
    layer_s = {p: sum(best[shape][p] for shape in LAYER.values()) for p in DECODE_PATHS}
    return {"shapes": [{"rows": r, "cols": c, **{p: best[(r, c)][p] for p in DECODE_PATHS}}
                       for r, c in best], "layer_s": layer_s}


def decode_markdown(dec: dict, calls: int) -> list[str]:
    lines = ["", f"Decode, 1 token: best µs per call (mean of {calls} calls) over interleaved "
             "rounds.", "", md_row("rows × cols", *DECODE_PATHS, "form_linear / BinaryLinear"),
             md_row(*["---"] * (len(DECODE_PATHS) + 2))]
    rows = [(f"{s['rows']} × {s['cols']}", s) for s in dec["shapes"]]
    for name, s in rows + [("decoder layer (7 linears)", dec["layer_s"])]:
        lines.append(md_row(name, *(f"{1e6 * s[p]:.1f}" for p in DECODE_PATHS),
                            f"{s['form_linear'] / s['BinaryLinear']:.2f}×"))
    return lines


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def markdown(res: dict) -> str:
    lines = [f"# Prefill, {res['tokens']} tokens, {res['method']} codes, "
             f"{res['threads']} thread(s), {res['cpu']}", "",
             "Best ms per call over interleaved rounds (one run on a shared CPU). bf16 "
             "instructions (AVX512-BF16 or AMX-BF16): "
             + ({True: "yes, the packed bf16 path's GEMM is bf16", False: "no, the packed bf16 "
                 "path's GEMM is fp32 on the bf16 values"}.get(res.get("bf16_instructions"),
                                                              "not recorded")) + ".", "",
             md_row("rows × cols", *PATHS, "bf16 path vs fp32 path"),
             md_row(*["---"] * (len(PATHS) + 2))]
    for s in res["shapes"]:
        lines.append(md_row(f"{s['rows']} × {s['cols']}", *(f"{1e3 * s[p]:.2f}" for p in PATHS),
                            f"{s['packed fp32'] / s['packed bf16']:.2f}×"))
    lay, tok = res["layer_s"], res["layer_tok_s"]
    lines.append(md_row("decoder layer (7 linears)", *(f"{1e3 * lay[p]:.1f}" for p in PATHS),
                        f"{lay['packed fp32'] / lay['packed bf16']:.2f}×"))
    lines.append(md_row("tokens/s (layer linears)", *(f"{tok[p]:.0f}" for p in PATHS), ""))
    if "decode" in res:
        lines += decode_markdown(res["decode"], res["calls"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="q1_0")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calls", type=int, default=500, help="decode calls per timed round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--stem", default="prefill", help="results file names (STEM.json, .md)")
    args = p.parse_args(argv)
    from binllm.kernels.cpu import fast_bf16_matmul

    torch.set_num_threads(args.threads)
    res = {"method": args.method, "tokens": args.tokens, "threads": args.threads,
           "repeats": args.repeats, "cpu": cpu_name(), "bf16_instructions": fast_bf16_matmul(),
           "calls": args.calls, "torch": torch.__version__,
           **measure(args.method, args.tokens, args.repeats),
           "decode": measure_decode(args.method, args.calls, args.repeats)}
    text = markdown(res)
    print(text)
    write_results(args.stem, res, text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
