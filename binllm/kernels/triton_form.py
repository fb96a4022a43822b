"""Triton kernel of the general kernel form (`binllm.kernels.form`): every codes type on a GPU.

For each BitPart of a layer's KernelForm (x versions xv_v = x[perm] · scale_v, P columns cut
into segments s of whole bytes), with B_t = planes[p_t] ∧ planes[p2_t] (p2_t = −1: one plane)

    y[m, r] += Σ_{t: p_t ≥ 0} Σ_s C_t[s, r] · Σ_{j∈s} B_t[r, j] · xv_{v_t}[m, j]  (kernel)
             + Σ_{t: p_t < 0} Σ_s C_t[s, r] · Σ_{j∈s} xv_{v_t}[m, j]            (host)

(C_t = Σ fac · coef over the term's entries, summed in the kernel).

One program owns BLOCK_R rows and BLOCK_M inputs; for every term it walks the segments and,
inside a segment, column tiles of BLOCK_K: it loads the planes' bytes of the tile (16-row
tiles: a tile's bytes of one plane column are contiguous), ANDs the second plane's in, expands
bit k of byte b to column 8b + k (binllm's bit order) and forms the tile's B·xv (a `tl.dot`
for BLOCK_M ≥ 16, a multiply-sum for the decode GEMV), then scales the segment's sum by its
coefficient. Only bit planes and per-(row, segment) coefficients are read. The constant terms
are (m, nseg) × (nseg, rows) matmuls of the segment sums; PB-LLM's sparse 8-bit part a
scatter-add over its CSR entries. Tests run it on the CPU with TRITON_INTERPRET=1 against
`codes.dequantize()`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .form import BitPart, KernelForm, part_inputs
from .form_ref import stages_of, term_coef

GEMV_MAX_BATCH = 4


@triton.jit
def bitpart_kernel(xv_ptr, planes_ptr, terms_ptr, cptr_ptr, cidx_ptr, fac_ptr, coef_ptr, seg_ptr,
                   y_ptr,
                   M, R, P, PB, NP, NSEG, T,
                   USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rmask = rows < R
    mmask = ms < M
    tile_base = (rows // 16) * NP  # (BR,) first plane of the row's tile
    lane = rows % 16
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for t in range(T):
        p = tl.load(terms_ptr + 3 * t)
        p2 = tl.load(terms_ptr + 3 * t + 1)
        v = tl.load(terms_ptr + 3 * t + 2)
        e0 = tl.load(cptr_ptr + t)
        e1 = tl.load(cptr_ptr + t + 1)
        for s in range(NSEG):
            c0 = tl.load(seg_ptr + s) * 8
            c1 = tl.load(seg_ptr + s + 1) * 8
            part = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(c0, c1, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)  # (BK,)
                cmask = cols < c1
                x = tl.load(xv_ptr + (v * M + ms[:, None]) * P + cols[None, :],
                            mask=mmask[:, None] & cmask[None, :], other=0.0)  # (BM, BK) fp32
                wmask = rmask[:, None] & cmask[None, :]
                at = (cols[None, :] >> 3) * 16 + lane[:, None]  # (BR, BK) within a tile's plane
                byte = tl.load(planes_ptr + ((tile_base[:, None] + p) * PB) * 16 + at,
                               mask=wmask, other=0).to(tl.int32)
                byte2 = tl.load(planes_ptr + ((tile_base[:, None] + tl.maximum(p2, 0)) * PB) * 16
                                + at, mask=wmask, other=0).to(tl.int32)
                byte2 = tl.where(p2 >= 0, byte2, 255)
                bit = (((byte & byte2) >> (cols[None, :] & 7)) & 1).to(tl.float32)  # (BR, BK)
                if USE_DOT:
                    part += tl.dot(x, tl.trans(bit), input_precision="ieee")
                else:
                    part += tl.sum(x[:, None, :] * bit[None, :, :], axis=2)
            c = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k in range(e0, e1):  # the term's coefficient: Σ fac · stored array
                ci = tl.load(cidx_ptr + k)
                c += tl.load(fac_ptr + k) * tl.load(coef_ptr + (ci * NSEG + s) * R + rows,
                                                    mask=rmask, other=0.0).to(tl.float32)
            acc += part * c[None, :]
    ymask = mmask[:, None] & rmask[None, :]
    ptrs = y_ptr + ms[:, None] * R + rows[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=ymask, other=0.0) + acc, mask=ymask)


def _segment_sums(part: BitPart, xv: Tensor) -> Tensor:
    """Σ_{j∈s} xv[m, v, j] per segment: (M, V, nseg) fp32."""
    nseg = part.seg.shape[0] - 1
    seg_of = torch.repeat_interleave(torch.arange(nseg, device=xv.device), part.seg.diff() * 8)
    out = xv.new_zeros(*xv.shape[:2], nseg)
    return out.index_add_(2, seg_of, xv)


def bitpart_matmul(part: BitPart, x: Tensor, y: Tensor, *, block_r: int | None = None) -> None:
    """y (M, rows) fp32 += the part's product with x (M, cols)."""
    M, R = y.shape
    xv = part_inputs(part, x)  # (M, V, P) fp32
    const = part.terms[:, 0] < 0
    if const.any():
        sums = _segment_sums(part, xv)  # (M, V, nseg)
        for t in torch.nonzero(const).flatten().tolist():
            y += sums[:, int(part.terms[t, 2])] @ term_coef(part, t)
    bit = torch.nonzero(~const).flatten()
    terms = part.terms[bit].contiguous()
    lo, hi = part.cptr[bit], part.cptr[bit + 1]  # the bit terms' entries, renumbered
    entries = torch.cat([torch.arange(a, b, device=y.device) for a, b in
                         zip(lo.tolist(), hi.tolist())]) if len(bit) else lo
    cptr = torch.cat([lo.new_zeros(1), (hi - lo).cumsum(0)])
    T = terms.shape[0]
    if T == 0:
        return
    xvt = xv.transpose(0, 1).contiguous()  # (V, M, P)
    P = part.width
    gemv = M <= GEMV_MAX_BATCH
    block_m = 1 if gemv else 16
    br = block_r or (16 if gemv else 32)
    grid = (triton.cdiv(R, br), triton.cdiv(M, block_m))
    bitpart_kernel[grid](
        xvt, part.planes.contiguous(), terms, cptr, part.cidx[entries].contiguous(),
        part.fac[entries].contiguous(), part.coef.contiguous(), part.seg.contiguous(), y,
        M, R, P, P // 8, part.planes.shape[1], part.seg.shape[0] - 1, T, USE_DOT=not gemv,
        BLOCK_M=block_m, BLOCK_R=br, BLOCK_K=64)


def form_matmul(form: KernelForm, x: Tensor, *, block_r: int | None = None) -> Tensor:
    """y = x Ŵᵀ (N, rows) fp32 for x (N, cols), computed from the kernel form (a ChainForm's
    stages in turn)."""
    if len(stages_of(form)) > 1:
        for stage in stages_of(form):
            x = form_matmul(stage, x, block_r=block_r)
        return x
    y = torch.zeros(x.shape[0], form.rows, dtype=torch.float32, device=x.device)
    for part in form.parts:
        bitpart_matmul(part, x, y, block_r=block_r)
    if form.sparse is not None:
        sp = form.sparse  # y[:, r] += value_k · x[:, col_k] over the row's entries k
        r = torch.repeat_interleave(torch.arange(form.rows, device=x.device), sp.rowptr.diff())
        y.index_add_(1, r, x.float()[:, sp.col.long()] * sp.values()[None])
    return y
