"""Triton kernel of the sign-plane form: y = x Ŵᵀ straight from the packed sign bytes.

For one sign plane with a scale per row and block of `bs` columns (rtn-sign, q1_0, block-sign:
the binary format with orders [1] and no salient columns),

    Ŵ[r, c] = μ[r, b] + α[r, b] · β[c] · S[r, c],   S = 2·bit − 1, b = c // bs
    y[m, r] = Σ_b α[r, b] · (S_b · (β ⊙ x_m)_b)[r] + μ[r, b] · Σ_{c ∈ b} x[m, c]

with bit i of the row-major stream at bit i % 8 of byte i // 8 (binllm.packed.packing). One
program computes a tile of BLOCK_R output rows for BLOCK_M inputs, walking the columns in tiles
of BLOCK_K: it loads the tile's sign bytes, expands them to ±1 in registers and forms the
tile's S·x (a `tl.dot` for BLOCK_M ≥ 16, the small-batch GEMM; a broadcast-multiply-sum for
BLOCK_M = 1, the decode GEMV). When BLOCK_K divides bs a tile lies in one scale block and α,
μ are applied once per row and tile, exactly the formula above ("aligned"); otherwise each
weight's α, μ are gathered and Ŵ's tile is formed in registers. Either way only the packed
bytes and the fp16 scales are read from memory, never a dequantized weight.

Accumulation is fp32; with fp16/bf16 inputs the ±1 signs and x enter `tl.dot` in that dtype
(exact products), with fp32 inputs at "ieee" precision (no TF32). Tests run the kernels on the
CPU with TRITON_INTERPRET=1 against `codes.dequantize()` (tests/test_triton_sign.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def sign_matmul_kernel(x_ptr, bits_ptr, alpha_ptr, mu_ptr, beta_ptr, y_ptr,
                       M, R, K, NBLK, BS, stride_xm, stride_ym,
                       HAS_MU: tl.constexpr, HAS_BETA: tl.constexpr, ALIGNED: tl.constexpr,
                       USE_DOT: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rmask = rows < R
    mmask = ms < M
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        cmask = cols < K
        xmask = mmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :], mask=xmask, other=0.0)
        xf = x.to(tl.float32)  # (BM, BK)
        if HAS_BETA:
            beta = tl.load(beta_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            xb = xf * beta[None, :]
        else:
            xb = xf
        wmask = rmask[:, None] & cmask[None, :]
        flat = rows[:, None].to(tl.int64) * K + cols[None, :]  # (BR, BK) stream index
        byte = tl.load(bits_ptr + (flat >> 3), mask=wmask, other=0).to(tl.int32)
        bit = (byte >> (flat & 7).to(tl.int32)) & 1
        s = tl.where(wmask, bit.to(tl.float32) * 2.0 - 1.0, 0.0)  # (BR, BK) ±1
        if ALIGNED:  # the tile lies in scale block b: α ⊙ (S x) + μ Σx
            b = k0 // BS
            a = tl.load(alpha_ptr + rows * NBLK + b, mask=rmask, other=0.0).to(tl.float32)
            if USE_DOT:
                part = tl.dot(xb.to(x.dtype), tl.trans(s.to(x.dtype)), input_precision=PREC)
            else:
                part = tl.sum(xb[:, None, :] * s[None, :, :], axis=2)  # (BM, BR)
            acc += part * a[None, :]
            if HAS_MU:
                mu = tl.load(mu_ptr + rows * NBLK + b, mask=rmask, other=0.0).to(tl.float32)
                acc += tl.sum(xf, axis=1)[:, None] * mu[None, :]
        else:  # gather each weight's block scale and mean: Ŵ's tile in registers
            bidx = rows[:, None] * NBLK + cols[None, :] // BS  # (BR, BK)
            a = tl.load(alpha_ptr + bidx, mask=wmask, other=0.0).to(tl.float32)
            w = s * a
            if USE_DOT:
                part = tl.dot(xb.to(x.dtype), tl.trans(w.to(x.dtype)), input_precision=PREC)
            else:
                part = tl.sum(xb[:, None, :] * w[None, :, :], axis=2)
            acc += part
            if HAS_MU:
                mu = tl.load(mu_ptr + bidx, mask=wmask, other=0.0).to(tl.float32)
                if USE_DOT:
                    acc += tl.dot(x, tl.trans(mu.to(x.dtype)), input_precision=PREC)
                else:
                    acc += tl.sum(xf[:, None, :] * mu[None, :, :], axis=2)
    ymask = mmask[:, None] & rmask[None, :]
    tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=ymask)


# -- host side ------------------------------------------------------------------------------------
GEMV_MAX_BATCH = 4  # up to this many input rows: one BLOCK_M = 1 program per row (decode)


def supports(layout) -> bool:
    """Whether `layout` (a PackedLayout) is one sign plane with per-row, per-block scales."""
    p = layout.params
    return (layout.format == "binary" and list(p["orders"]) == [1] and int(p["n_salient"]) == 0
            and int(p["planes"]) == 1 and "q8_rows" not in p)  # fp16/fp32 scales only


def _tile_k(bs: int) -> tuple[int, bool]:
    """(BLOCK_K, aligned): the largest power of two ≤ 128 dividing bs when it is ≥ 16."""
    k = 128
    while k >= 16:
        if bs % k == 0:
            return k, True
        k //= 2
    return 64, False


def sign_linear(x: Tensor, layout, packed: Mapping[str, Tensor],
                bias: Tensor | None = None, *, block_r: int | None = None) -> Tensor:
    """y = x Ŵᵀ (+ bias) for x (…, in_features) from the layer's packed buffers.

    packed: "signs0" uint8 bits(rows·cols), "alpha" (1, rows, nblk), optional "mu"
    (1, rows, nblk) and "beta_rest" (1, cols), as `binllm.packed.formats` stores them.
    """
    if not supports(layout):
        raise ValueError(f"the Triton sign kernel takes one sign plane without salient columns, "
                         f"not {layout.format} {dict(layout.params)}")
    R, K = layout.out_features, layout.in_features
    bs = int(layout.params["block_size"])
    nblk = -(-K // bs)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, R, dtype=x.dtype, device=x.device)
    alpha = packed["alpha"].reshape(R, nblk).contiguous()
    mu = packed["mu"].reshape(R, nblk).contiguous() if "mu" in packed else alpha
    beta = packed["beta_rest"].reshape(K).contiguous() if "beta_rest" in packed else alpha
    block_k, aligned = _tile_k(bs)
    gemv = M <= GEMV_MAX_BATCH
    block_m = 1 if gemv else 16
    br = block_r or (16 if gemv else 64)
    grid = (triton.cdiv(R, br), triton.cdiv(M, block_m))
    sign_matmul_kernel[grid](
        x2, packed["signs0"], alpha, mu, beta, y, M, R, K, nblk, bs, x2.stride(0), y.stride(0),
        HAS_MU="mu" in packed, HAS_BETA="beta_rest" in packed, ALIGNED=aligned,
        USE_DOT=not gemv, PREC="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_R=br, BLOCK_K=block_k)
    if bias is not None:
        y += bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], R)


def describe() -> dict[str, Any]:
    """What the benchmark records about the kernel configuration."""
    return {"gemv_max_batch": GEMV_MAX_BATCH, "triton": triton.__version__}
