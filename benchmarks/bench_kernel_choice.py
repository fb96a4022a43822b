"""Which CPU kernel (issue 10, §2): numba LUT GEMV against binllm's C++ AVX-512 LUT GEMV.

One 4096×4096 sign plane (rtn-sign codes: Ŵ = μ + α·S per row), batch 1, `--threads` threads,
hot cache (the same matrix every call), best of `--repeats` interleaved calls; dense bf16 and
fp32 F.linear on the same shape in the same loop. The numba kernel is the issue's sketch: per
group of 8 activations a 256-entry table of signed partial sums, one lookup per packed byte and
row (`@njit(parallel=True, cache=True)`); numba is not a binllm dependency (pip install numba).

    python benchmarks/bench_kernel_choice.py [--threads 2] [--repeats 200]
Writes benchmarks/results/kernel_choice.json (and prints the table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def numba_kernel():
    from numba import njit, prange

    @njit(parallel=True, cache=True)
    def lut_gemv(bits, x, alpha, mu, out):  # bits (rows, nb) uint8, x (cols,) f32
        nb = bits.shape[1]
        T = np.empty((nb, 256), np.float32)
        for j in prange(nb):
            for b in range(256):
                s = np.float32(0.0)
                for k in range(8):
                    s += x[8 * j + k] if (b >> k) & 1 else -x[8 * j + k]
                T[j, b] = s
        xs = x.sum()
        for r in prange(bits.shape[0]):
            acc = np.float32(0.0)
            for j in range(nb):
                acc += T[j, bits[r, j]]
            out[r] = alpha[r] * acc + mu[r] * xs
    return lut_gemv


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_kernels import layout_codes, like_codes  # noqa: E402

    from binllm.kernels import cpu
    from binllm.kernels.form import kernel_form
    from binllm.packed.packing import pack_bits

    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import numba
    numba.set_num_threads(args.threads)
    codes = layout_codes(like_codes("rtn-sign"), 4096, 4096, 512, torch.Generator().manual_seed(1))
    form = kernel_form(codes)
    W = codes.dequantize()
    x = torch.randn(1, 4096)
    bits = pack_bits(codes.signs[0]).numpy()  # (rows, 512) bytes
    alpha = codes.alpha[0, 0, :, 0].numpy().copy()
    mu = codes.mu[0, :, 0].numpy().copy()
    xn = x[0].numpy().copy()
    out = np.empty(4096, np.float32)
    lut = numba_kernel()
    lut(bits, xn, alpha, mu, out)  # compile (cached on disk afterwards)
    ref = (x @ W.T)[0]
    err_numba = float((torch.from_numpy(out) - ref).abs().max())
    err_cpp = float((cpu.form_matmul(form, x)[0] - ref).abs().max())
    Wb, xb = W.bfloat16(), x.bfloat16()
    runs = {"numba LUT": lambda: lut(bits, xn, alpha, mu, out),
            "C++ AVX-512 (binllm)": lambda: cpu.form_matmul(form, x),
            "dense bf16 F.linear": lambda: F.linear(xb, Wb),
            "dense fp32 F.linear": lambda: F.linear(x, W)}
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    res = {"threads": args.threads, "repeats": args.repeats, "shape": [4096, 4096],
           "best_ms": {k: 1e3 * v for k, v in best.items()},
           "max_abs_error_vs_dequantized": {"numba LUT": err_numba, "C++ AVX-512": err_cpp}}
    for k, v in res["best_ms"].items():
        print(f"{k}: {v:.3f} ms")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "kernel_choice.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
