"""Kernel form of a layer's codes: Ŵx as a few {0,1} bit planes with scalar coefficients.

Every codes type is rewritten once (at load, from the codes alone: no format change) as

    Ŵ x = Σ_parts BitPart(x)  +  SparsePart(x)            (`KernelForm`, y = form · x)

**BitPart.** Its own P columns j (a gather of x's columns, zero-padded), cut into segments of
whole bytes of 8 columns (segment s = bytes [seg[s], seg[s+1]) of every plane row):

    xv_v[j] = x[perm[j]] · scale[v, j]                  x[−1] = 0 (padding); scale None: V = 1, 1
    y[r]   += Σ_t Σ_s C_t[s, r] · Σ_{j∈s} B_t[r, j] · xv_{v_t}[j]
    B_t     = planes[p_t] ∧ planes[p2_t]       (p2_t = −1: planes[p_t] alone; p_t = −1: B_t = 1)
    C_t     = Σ_{k ∈ [cptr[t], cptr[t+1])} fac[k] · coef[cidx[k]]

| field  | meaning                                                     | shape, dtype           |
|--------|-------------------------------------------------------------|------------------------|
| perm   | x column of part column j, −1 = padding                     | (P,) int64             |
| scale  | column scales of the x versions (ARB-RC's β), or None       | (V, P) fp32            |
| seg    | byte offset of each segment in a plane row (8 columns/byte) | (nseg + 1,) int64      |
| planes | bit planes in 16-row tiles (below)               | (⌈rows/16⌉, NP, P/8, 16) uint8 |
| terms  | per term t: p_t, p2_t, version v_t                          | (T, 3) int64           |
| cptr   | term t's entries are cptr[t] … cptr[t+1] − 1                | (T + 1,) int64         |
| cidx   | per entry: the stored coefficient array it reads            | (nnz,) int64           |
| fac    | per entry: its factor                                       | (nnz,) fp32            |
| coef   | the distinct coefficient arrays (below)                     | (C, nseg, rows) fp16/32 |

planes[i, k, b, q] is byte b of row 16i + q of plane k (bit l of byte b is column 8b + l, the
packing's order; padding rows are 0), so a 16-row tile's bytes of one byte column are
contiguous. coef holds the codes' own α, μ (an array that is ±2^k times another is stored
once), 16 rows of one segment contiguous; fp16 when every value is exactly an fp16 (the codes'
fp16 scales), else fp32.

Planes that are the AND of two stored planes (a group bit and a sign) are never stored: the
kernels AND the bytes, and sum a term's coefficient from the stored arrays (so that a
coefficient such as μ_g − μ* − α_g + α* costs no memory of its own). Zero arrays are dropped.

**SparsePart** (PB-LLM's salient weights, CSR by row, k over the row's entries):

    y[r] += Σ_k (scale[r] · (q_k − zero[r]) − sub[r, col_k // groupsize]) · x[col_k]

Which codes give which form (`kernel_form(codes)`):
- BinaryCodes (rtn-sign, BiLLM, ARB-*): one BitPart per column class (salient columns, the
  rest); a segment is the class's columns of one codes block, gathered to the front of the
  part (x permuted to match). In a class with groups g and reference group g* (highest order),
  with S_o = 2 s_o − 1 and I_g the group's indicator (I_g* = 1 − Σ_{g≠g*} I_g):
      Ŵ = μ* − Σ_o α*_o β*_o + Σ_o 2 α*_o β*_o s_o
          + Σ_{g≠g*} [ I_g (μ_g − μ* − Σ_o α_go β_go + Σ_o α*_o β*_o)
                       + Σ_o (I_g ∧ s_o) (2 α_go β_go − 2 α*_o β*_o) ]
  so the stored planes are the signs and the group bits (BiLLM: 2 planes on salient columns,
  2 + the AND on the rest); ARB-RC's β_go become x versions (β folded into x).
- UniformCodes (GPTQ): its own form, bit-serial: Ŵ = Σ_k 2^k s · q_k − s·z, one BitPart with
  `bits` planes, segments = quantization groups.
- PartialBinaryCodes (PB-LLM): a BitPart Ŵ_low = (μ − α) + 2α·(s ∧ ¬salient) over all
  columns (segments = groups), plus a SparsePart holding the 8-bit salient levels, whose
  value replaces the binary one: value − (μ − α) of the weight's group.

- FactorCodes (binary-factor): a `ChainForm` of two one-plane forms, t = S_Vᵀ (s_in ⊙ x)
  (r rows: plane v, x version s_in) then y = s_out ⊙ S_U t (plane u), with S = 2·bit − 1:
      t = 2 · (v-plane · xv) − Σ xv,     y = 2 s_out · (u-plane · t) − s_out · Σ t
  one segment per stage; the kernels run the stages in turn (the t vector stays fp32).

The types and the BitPart builder live in `binllm.kernels.form_parts`;
`binllm.kernels.form_ref` evaluates the form with plain PyTorch (`form_dense` rebuilds Ŵ, a
test oracle; `form_matmul_torch` is the kernels' fallback). All fields are plain tensors:
`form.to(device)`.
"""

from __future__ import annotations

from functools import singledispatch

import torch
from torch import Tensor

from ..methods.codes import BinaryCodes, PartialBinaryCodes, UniformCodes
from ..methods.factor_codes import FactorCodes
from .form_parts import BitPart, ChainForm, KernelForm, PartBuilder, SparsePart
from .form_ref import form_dense, form_matmul_torch, part_inputs

# -- codes → form --------------------------------------------------------------------------
@singledispatch
def kernel_form(codes) -> KernelForm:
    """The kernel form of a codes container (derived from the codes alone)."""
    raise TypeError(f"no kernel form for {type(codes).__name__}; add one in binllm/kernels/form.py")


@kernel_form.register
def _(codes: BinaryCodes) -> KernelForm:
    rows, cols = codes.shape
    dev = codes.group.device
    B = codes.block_size
    nblk = codes.alpha.shape[-1]
    sal_cols = codes.salient_cols.bool()
    G = len(codes.orders)
    parts = []
    for sal, groups in ((True, range(codes.n_salient)), (False, range(codes.n_salient, G))):
        in_class = sal_cols if sal else ~sal_cols  # (cols,)
        columns, blocks = [], []
        for b in range(nblk):
            c = torch.nonzero(in_class[b * B:(b + 1) * B]).flatten() + b * B
            if c.numel():
                columns.append(c)
                blocks.append(b)
        if not columns or not len(groups):
            continue
        pb = PartBuilder(columns, rows, dev)
        blk = torch.tensor(blocks, device=dev)

        def A(g, o):  # (rows, nseg)
            return codes.alpha[g, o][:, blk].float()

        def M(g):
            return codes.mu[g][:, blk].float() if codes.mu is not None else None

        def v(g, o):  # version of pair (g, o): β folded into x, or plain x
            if codes.beta is None:
                return pb.version(None, None)
            return pb.version((g, o), codes.beta[g, o])

        def S(o):
            return {("s", o): lambda: codes.signs[o]}

        order = {g: codes.orders[g] for g in groups}
        ref = max(groups, key=lambda g: (order[g], g))
        if M(ref) is not None:
            pb.const(pb.version(None, None), M(ref))
        for o in range(order[ref]):
            pb.const(v(ref, o), -A(ref, o))
            pb.term(S(o), v(ref, o), 2 * A(ref, o))
        for g in groups:
            if g == ref:
                continue
            ind = {("I", g): lambda g=g: codes.group == g}
            if M(g) is not None:
                pb.term(ind, pb.version(None, None), M(g))
                pb.term(ind, pb.version(None, None), -M(ref))
            for o in range(order[g]):
                pb.term(ind, v(g, o), -A(g, o))
                pb.term({**ind, **S(o)}, v(g, o), 2 * A(g, o))
            for o in range(order[ref]):
                pb.term(ind, v(ref, o), A(ref, o))
                pb.term({**ind, **S(o)}, v(ref, o), -2 * A(ref, o))
        parts.append(pb.build())
    return KernelForm(rows, cols, tuple(parts))


def _group_columns(cols: int, groupsize: int, device) -> list[Tensor]:
    return [torch.arange(s, min(s + groupsize, cols), device=device)
            for s in range(0, cols, groupsize)]


@kernel_form.register
def _(codes: UniformCodes) -> KernelForm:
    rows, cols = codes.shape
    dev = codes.q.device
    pb = PartBuilder(_group_columns(cols, codes.groupsize, dev), rows, dev)
    plain = pb.version(None, None)
    s = codes.scale.float()  # (rows, ngroups) = (rows, nseg)
    pb.const(plain, -s * codes.zero.float())
    for k in range(codes.bits):
        pb.term({("q", k): lambda k=k: ((codes.q >> k) & 1).bool()}, plain, s * 2.0 ** k)
    return KernelForm(rows, cols, (pb.build(),))


@kernel_form.register
def _(codes: PartialBinaryCodes) -> KernelForm:
    rows, cols = codes.shape
    dev = codes.signs.device
    sal = codes.salient.bool()
    pb = PartBuilder(_group_columns(cols, codes.groupsize, dev), rows, dev)
    plain = pb.version(None, None)
    low0 = codes.mu.float() - codes.alpha.float()  # (rows, ngroups): Ŵ where the sign is −1
    pb.const(plain, codes.mu.float())
    pb.const(plain, -codes.alpha.float())
    pb.term({("s",): lambda: codes.signs.bool() & ~sal}, plain, 2 * codes.alpha.float())
    r, c = sal.nonzero(as_tuple=True)  # row-major order
    counts = torch.bincount(r, minlength=rows)
    sparse = SparsePart(
        rowptr=torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
        col=c.to(torch.uint16 if cols <= 2**16 else torch.int32),
        q=codes.q_high[r, c].to(torch.uint8),
        scale=codes.high_scale.float(), zero=codes.high_zero.float(), sub=low0,
        groupsize=codes.groupsize)
    return KernelForm(rows, cols, (pb.build(),), sparse)


def _sign_stage(plane: Tensor, row_scale: Tensor, col_scale: Tensor | None) -> KernelForm:
    """The form of diag(row_scale) · (2·plane − 1) · diag(col_scale) (col_scale None: 1), for
    plane (rows, cols) bool: one segment, the ±1 signs as 2·bit − 1."""
    rows, cols = plane.shape
    dev = plane.device
    pb = PartBuilder([torch.arange(cols, device=dev)], rows, dev)
    xv = pb.version(None if col_scale is None else "s", col_scale)
    c = row_scale.float()[:, None]  # (rows, nseg = 1)
    pb.term({"s": lambda: plane.bool()}, xv, 2 * c)
    pb.const(xv, -c)
    return KernelForm(rows, cols, (pb.build(),))


@kernel_form.register
def _(codes: FactorCodes) -> ChainForm:
    rows, cols = codes.shape
    ones = torch.ones(codes.rank, device=codes.u.device)
    inner = _sign_stage(codes.v.T, ones, codes.s_in)  # t = S_Vᵀ (s_in ⊙ x)   (r,)
    outer = _sign_stage(codes.u, codes.s_out, None)  # y = s_out ⊙ S_U t      (rows,)
    return ChainForm(rows, cols, (inner, outer))


__all__ = ["BitPart", "SparsePart", "KernelForm", "ChainForm", "kernel_form", "form_dense",
           "form_matmul_torch", "part_inputs"]
