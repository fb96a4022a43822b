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

`binllm.kernels.form_ref` evaluates the form with plain PyTorch (`form_dense` rebuilds Ŵ, a
test oracle; `form_matmul_torch` is the kernels' fallback). All fields are plain tensors:
`form.to(device)`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import singledispatch

import torch
from torch import Tensor

from ..methods.codes import BinaryCodes, PartialBinaryCodes, UniformCodes
from ..packed.packing import pack_bits
from .form_ref import form_dense, form_matmul_torch, part_inputs, tile_planes

CHUNK = 8  # columns per segment chunk: segments are whole bytes of each plane row
FACTORS = frozenset(s * 2.0 ** k for s in (1, -1) for k in range(-2, 8))  # sharing multiples


def _move(obj, device):
    return replace(obj, **{f.name: getattr(obj, f.name).to(device) for f in fields(obj)
                           if isinstance(getattr(obj, f.name), Tensor)})


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class BitPart:
    """Σ of {0,1} bit planes (or ANDs of two) times per-(row, segment) coefficients."""

    rows: int
    perm: Tensor
    scale: Tensor | None
    seg: Tensor
    planes: Tensor
    terms: Tensor
    cptr: Tensor
    cidx: Tensor
    fac: Tensor
    coef: Tensor

    @property
    def width(self) -> int:
        return self.perm.shape[0]

    def nbytes(self) -> int:
        return _nbytes(self.perm, self.scale, self.seg, self.planes, self.terms, self.cptr,
                       self.cidx, self.fac, self.coef)

    def to(self, device) -> BitPart:
        return _move(self, device)


@dataclass(frozen=True)
class SparsePart:
    """CSR of salient weights: value = scale[r]·(q − zero[r]) − sub[r, col // groupsize]."""

    rowptr: Tensor   # (rows + 1,) int64
    col: Tensor      # (n,) uint16 (cols ≤ 65536) or int32
    q: Tensor        # (n,) uint8
    scale: Tensor    # (rows,) fp32
    zero: Tensor     # (rows,) fp32
    sub: Tensor      # (rows, ngroups) fp32
    groupsize: int

    def values(self) -> Tensor:
        """Each entry's value (n,) fp32."""
        rows = self.rowptr.shape[0] - 1
        r = torch.repeat_interleave(torch.arange(rows, device=self.col.device),
                                    self.rowptr.diff())
        c = self.col.long()
        return self.scale[r] * (self.q.float() - self.zero[r]) - self.sub[r, c // self.groupsize]

    def nbytes(self) -> int:
        return _nbytes(self.rowptr, self.col, self.q, self.scale, self.zero, self.sub)

    def to(self, device) -> SparsePart:
        return _move(self, device)


@dataclass(frozen=True)
class KernelForm:
    """Ŵ (rows, cols) as Σ BitPart + SparsePart; see the module docstring."""

    rows: int
    cols: int
    parts: tuple[BitPart, ...]
    sparse: SparsePart | None = None

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts) + (self.sparse.nbytes() if self.sparse else 0)

    def to(self, device) -> KernelForm:
        return replace(self, parts=tuple(p.to(device) for p in self.parts),
                       sparse=None if self.sparse is None else self.sparse.to(device))


# -- building a BitPart ---------------------------------------------------------------------
def _segments(columns: list[Tensor], device) -> tuple[Tensor, Tensor]:
    """perm (P,) and seg (nseg + 1,) byte offsets from each segment's column indices."""
    perm, seg = [], [0]
    for c in columns:
        pad = -c.numel() % CHUNK
        perm += [c.long(), torch.full((pad,), -1, dtype=torch.long, device=device)]
        seg.append(seg[-1] + (c.numel() + pad) // 8)
    return torch.cat(perm), torch.tensor(seg, dtype=torch.long, device=device)


def _share(arrays: list[Tensor]) -> tuple[list[Tensor], list[tuple[int, float]]]:
    """Distinct arrays and, per input array, (index, factor) with array = factor · distinct."""
    distinct, refs = [], []
    for a in arrays:
        for i, d in enumerate(distinct):
            j = d.abs().argmax()
            k = float(a.flatten()[j] / d.flatten()[j])
            if k in FACTORS and torch.equal(a, k * d):
                refs.append((i, k))
                break
        else:
            refs.append((len(distinct), 1.0))
            distinct.append(a)
    return distinct, refs


class _PartBuilder:
    """Collects terms (plane keys, version key) → coefficient arrays (rows, nseg) to sum;
    plane keys () = the constant term."""

    def __init__(self, columns: list[Tensor], rows: int, device):
        self.perm, self.seg = _segments(columns, device)
        self.rows, self.device = rows, device
        self.planes: dict = {}     # key -> bool (rows, P) plane
        self.versions: dict = {}   # key -> (P,) fp32 scale, or None for plain x
        self.terms: dict = {}      # ((plane keys), version key) -> [(rows, nseg), ...]

    def gather(self, full: Tensor) -> Tensor:
        """A (rows, cols) or (cols,) tensor at the part's columns, padding = 0."""
        pad = torch.zeros(*full.shape[:-1], 1, dtype=full.dtype, device=full.device)
        return torch.cat([full, pad], dim=-1)[..., self.perm]

    def version(self, key, scale_cols: Tensor | None) -> object:
        if key not in self.versions:
            self.versions[key] = None if scale_cols is None else \
                self.gather(scale_cols.to(torch.float32))
        return key

    def term(self, planes: dict, vkey, c: Tensor) -> None:
        """Add c · (AND of `planes`, key -> bool (rows, cols) plane thunk; {} = 1) · xv_vkey."""
        for pkey, fn in planes.items():
            if pkey not in self.planes:
                self.planes[pkey] = self.gather(fn())
        k = (tuple(planes), vkey)
        self.terms.setdefault(k, []).append(c.float())

    def const(self, vkey, c: Tensor) -> None:
        self.term({}, vkey, c)

    def build(self) -> BitPart:
        parts = {k: [c.T.contiguous() for c in cs if bool((c != 0).any())]  # (nseg, rows)
                 for k, cs in self.terms.items()}
        coef, refs = _share([c for cs in parts.values() for c in cs])
        sums, at = {}, 0
        for k, cs in parts.items():  # per term: stored array -> summed factor
            fac: dict = {}
            for i, f in refs[at:at + len(cs)]:
                fac[i] = fac.get(i, 0.0) + f
            at += len(cs)
            if any(f != 0 for f in fac.values()):
                sums[k] = {i: f for i, f in fac.items() if f != 0}
        keys = list(sums)
        vkeys = list(dict.fromkeys(v for _, v in keys)) or [None]
        pkeys = list(dict.fromkeys(p for ps, _ in keys for p in ps))
        if all(self.versions.get(v) is None for v in vkeys) and len(vkeys) == 1:
            scale = None
        else:
            ones = torch.ones(self.perm.shape[0], device=self.device) * (self.perm >= 0)
            scale = torch.stack([ones if self.versions[v] is None else self.versions[v]
                                 for v in vkeys])  # (V, P)
        planes = torch.stack([pack_bits(self.planes[k]) for k in pkeys]) if pkeys else \
            torch.zeros(0, self.rows, self.perm.shape[0] // 8, dtype=torch.uint8,
                        device=self.device)
        nseg = self.seg.shape[0] - 1
        coef = torch.stack(coef) if coef else torch.zeros(0, nseg, self.rows, device=self.device)
        if torch.equal(coef.half().float(), coef):
            coef = coef.half()  # the codes' fp16 scales: exact in half the bytes
        terms = [[*(pkeys.index(p) for p in ps), *[-1] * (2 - len(ps)), vkeys.index(v)]
                 for ps, v in keys]
        lens = torch.tensor([0] + [len(sums[k]) for k in keys], dtype=torch.long)
        return BitPart(
            rows=self.rows, perm=self.perm, scale=scale, seg=self.seg,
            planes=tile_planes(planes),
            terms=torch.tensor(terms, dtype=torch.long, device=self.device).reshape(-1, 3),
            cptr=lens.cumsum(0).to(self.device),
            cidx=torch.tensor([i for k in keys for i in sums[k]], dtype=torch.long,
                              device=self.device),
            fac=torch.tensor([f for k in keys for f in sums[k].values()], dtype=torch.float32,
                             device=self.device),
            coef=coef)


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
        pb = _PartBuilder(columns, rows, dev)
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
    pb = _PartBuilder(_group_columns(cols, codes.groupsize, dev), rows, dev)
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
    pb = _PartBuilder(_group_columns(cols, codes.groupsize, dev), rows, dev)
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


__all__ = ["BitPart", "SparsePart", "KernelForm", "kernel_form", "form_dense",
           "form_matmul_torch", "part_inputs"]
