"""Kernel form of a layer's codes: Ŵx as a few {0,1} bit planes with scalar coefficients.

Every codes type is rewritten once (at load, from the codes alone: no format change) as

    Ŵ x = Σ_parts BitPart(x)  +  SparsePart(x)            (`KernelForm`, y = form · x)

**BitPart.** Its own P columns j (a gather of x's columns, zero-padded), cut into segments of
whole 16-column chunks (segment s = bytes [seg[s], seg[s+1]) of every plane row):

    xv_v[j] = x[perm[j]] · scale[v, j]                  x[−1] = 0 (padding); scale None: V = 1, 1
    y[r]   += Σ_t Σ_s coef[t, r, s] · Σ_{j∈s} B_{plane[t]}[r, j] · xv_{ver[t]}[j]
            + Σ_v Σ_s const[v, r, s] · Σ_{j∈s} xv_v[j]

| field  | meaning                                                    | shape, dtype         |
|--------|------------------------------------------------------------|----------------------|
| perm   | x column of part column j, −1 = padding                    | (P,) int64           |
| scale  | column scales of the x versions (ARB-RC's β), or None      | (V, P) fp32          |
| seg    | byte offset of each segment in a plane row (16 cols = 2 B) | (nseg + 1,) int64    |
| planes | bit planes: bit k of byte b is column 8b + k (packing's order) | (NP, rows, P/8) uint8|
| plane  | plane of term t                                            | (T,) int64           |
| ver    | x version of term t                                        | (T,) int64           |
| coef   | coefficient of term t on row r, segment s                  | (T, rows, nseg) fp32 |
| const  | coefficient of Σ_{j∈s} xv_v[j]                             | (V, rows, nseg) fp32 |

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
  so planes are the signs, the group bits and their AND (BiLLM: 2 planes on salient
  columns, 3 on the rest); ARB-RC's β_go become x versions (β folded into x).
- UniformCodes (GPTQ): its own form, bit-serial: Ŵ = Σ_k 2^k s · q_k − s·z, one BitPart with
  `bits` planes, segments = quantization groups.
- PartialBinaryCodes (PB-LLM): a BitPart Ŵ_low = (μ − α) + 2α·(s ∧ ¬salient) over all
  columns (segments = groups), plus a SparsePart holding the 8-bit salient levels, whose
  value replaces the binary one: value − (μ − α) of the weight's group.

`form_dense(form)` rebuilds Ŵ (a test oracle); `form_matmul_torch(form, x)` is the pure-PyTorch
product (the fallback of `binllm.kernels.cpu`). All fields are plain tensors: `form.to(device)`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import singledispatch

import torch
from torch import Tensor

from ..methods.codes import BinaryCodes, PartialBinaryCodes, UniformCodes
from ..packed.packing import pack_bits, unpack_bits

CHUNK = 16  # columns per segment chunk: segments are whole chunks (2 bytes of each plane row)


def _move(obj, device):
    return replace(obj, **{f.name: getattr(obj, f.name).to(device) for f in fields(obj)
                           if isinstance(getattr(obj, f.name), Tensor)})


@dataclass(frozen=True)
class BitPart:
    """Σ of {0,1} bit planes times per-(row, segment) coefficients (module docstring)."""

    perm: Tensor
    scale: Tensor | None
    seg: Tensor
    planes: Tensor
    plane: Tensor
    ver: Tensor
    coef: Tensor
    const: Tensor

    @property
    def width(self) -> int:
        return self.perm.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.perm, self.scale, self.seg, self.planes, self.plane, self.ver,
                    self.coef, self.const) if t is not None)

    def to(self, device) -> BitPart:
        return _move(self, device)


@dataclass(frozen=True)
class SparsePart:
    """CSR of salient weights: value = scale[r]·(q − zero[r]) − sub[r, col // groupsize]."""

    rowptr: Tensor   # (rows + 1,) int64
    col: Tensor      # (n,) int32
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
        return sum(t.numel() * t.element_size() for t in
                   (self.rowptr, self.col, self.q, self.scale, self.zero, self.sub))

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


class _PartBuilder:
    """Collects terms (plane key, version key) → coef (rows, nseg) and constants per version."""

    def __init__(self, columns: list[Tensor], rows: int, device):
        self.perm, self.seg = _segments(columns, device)
        self.rows, self.device = rows, device
        self.planes: dict = {}     # key -> bool (rows, P) plane
        self.versions: dict = {}   # key -> (P,) fp32 scale, or None for plain x
        self.terms: dict = {}      # (plane key, version key) -> (rows, nseg)
        self.consts: dict = {}     # version key -> (rows, nseg)

    def gather(self, full: Tensor) -> Tensor:
        """A (rows, cols) or (cols,) tensor at the part's columns, padding = 0."""
        pad = torch.zeros(*full.shape[:-1], 1, dtype=full.dtype, device=full.device)
        return torch.cat([full, pad], dim=-1)[..., self.perm]

    def version(self, key, scale_cols: Tensor | None) -> object:
        if key not in self.versions:
            self.versions[key] = None if scale_cols is None else \
                self.gather(scale_cols.to(torch.float32))
        return key

    def term(self, pkey, plane_fn, vkey, c: Tensor) -> None:
        if pkey not in self.planes:
            self.planes[pkey] = self.gather(plane_fn())
        k = (pkey, vkey)
        self.terms[k] = self.terms[k] + c if k in self.terms else c

    def const(self, vkey, c: Tensor) -> None:
        self.consts[vkey] = self.consts[vkey] + c if vkey in self.consts else c

    def build(self) -> BitPart:
        vkeys = list(dict.fromkeys([*self.consts, *(v for _, v in self.terms)]))
        pkeys = list(self.planes)
        nseg = self.seg.shape[0] - 1
        zeros = torch.zeros(self.rows, nseg, device=self.device)
        if all(self.versions[v] is None for v in vkeys) and len(vkeys) == 1:
            scale = None
        else:
            ones = torch.ones(self.perm.shape[0], device=self.device) * (self.perm >= 0)
            scale = torch.stack([ones if self.versions[v] is None else self.versions[v]
                                 for v in vkeys])  # (V, P)
        planes = torch.stack([pack_bits(self.planes[k]) for k in pkeys]) if pkeys else \
            torch.zeros(0, self.rows, self.perm.shape[0] // 8, dtype=torch.uint8,
                        device=self.device)
        keys = list(self.terms)
        return BitPart(
            perm=self.perm, scale=scale, seg=self.seg, planes=planes,
            plane=torch.tensor([pkeys.index(p) for p, _ in keys], dtype=torch.long,
                               device=self.device),
            ver=torch.tensor([vkeys.index(v) for _, v in keys], dtype=torch.long,
                             device=self.device),
            coef=torch.stack([self.terms[k].float() for k in keys]) if keys else
            torch.zeros(0, self.rows, nseg, device=self.device),
            const=torch.stack([self.consts.get(v, zeros).float() for v in vkeys]))


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

        order = {g: codes.orders[g] for g in groups}
        ref = max(groups, key=lambda g: (order[g], g))
        if M(ref) is not None:
            pb.const(pb.version(None, None), M(ref))
        for o in range(order[ref]):
            pb.const(v(ref, o), -A(ref, o))
            pb.term(("s", o), lambda o=o: codes.signs[o], v(ref, o), 2 * A(ref, o))
        for g in groups:
            if g == ref:
                continue

            def ind(g=g):
                return codes.group == g

            if M(g) is not None:
                pb.term(("I", g), ind, pb.version(None, None), M(g) - M(ref))
            for o in range(order[g]):
                pb.term(("I", g), ind, v(g, o), -A(g, o))
                pb.term(("Is", g, o), lambda g=g, o=o: (codes.group == g) & codes.signs[o],
                        v(g, o), 2 * A(g, o))
            for o in range(order[ref]):
                pb.term(("I", g), ind, v(ref, o), A(ref, o))
                pb.term(("Is", g, o), lambda g=g, o=o: (codes.group == g) & codes.signs[o],
                        v(ref, o), -2 * A(ref, o))
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
        pb.term(("q", k), lambda k=k: ((codes.q >> k) & 1).bool(), plain, s * 2.0 ** k)
    return KernelForm(rows, cols, (pb.build(),))


@kernel_form.register
def _(codes: PartialBinaryCodes) -> KernelForm:
    rows, cols = codes.shape
    dev = codes.signs.device
    sal = codes.salient.bool()
    pb = _PartBuilder(_group_columns(cols, codes.groupsize, dev), rows, dev)
    plain = pb.version(None, None)
    low0 = codes.mu.float() - codes.alpha.float()  # (rows, ngroups): Ŵ where the sign is −1
    pb.const(plain, low0)
    pb.term(("s",), lambda: codes.signs.bool() & ~sal, plain, 2 * codes.alpha.float())
    r, c = sal.nonzero(as_tuple=True)  # row-major order
    counts = torch.bincount(r, minlength=rows)
    sparse = SparsePart(
        rowptr=torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
        col=c.to(torch.int32), q=codes.q_high[r, c].to(torch.uint8),
        scale=codes.high_scale.float(), zero=codes.high_zero.float(), sub=low0,
        groupsize=codes.groupsize)
    return KernelForm(rows, cols, (pb.build(),), sparse)


# -- reference evaluation -------------------------------------------------------------------
def _part_dense(part: BitPart, rows: slice, v: int) -> Tensor:
    """Rows `rows` of part's weight over its P columns for x version v (n, P) fp32."""
    P = part.width
    nseg = part.seg.shape[0] - 1
    seg_of = torch.repeat_interleave(torch.arange(nseg, device=part.perm.device),
                                     part.seg.diff() * 8)  # (P,)
    W = part.const[v, rows][:, seg_of].clone()  # (n, P)
    for t in range(part.plane.shape[0]):
        if int(part.ver[t]) != v:
            continue
        bits = unpack_bits(part.planes[int(part.plane[t]), rows], P).float()  # (n, P)
        W += part.coef[t, rows][:, seg_of] * bits
    return W


def form_dense(form: KernelForm) -> Tensor:
    """Ŵ (rows, cols) fp32 rebuilt from the form (a test oracle; the kernels never do this)."""
    W = torch.zeros(form.rows, form.cols + 1, device=_device(form))
    for part in form.parts:
        V = 1 if part.scale is None else part.scale.shape[0]
        idx = torch.where(part.perm >= 0, part.perm, form.cols)
        for v in range(V):
            Wv = _part_dense(part, slice(None), v)
            if part.scale is not None:
                Wv = Wv * part.scale[v]
            W.index_add_(1, idx, Wv)
    if form.sparse is not None:
        sp = form.sparse
        r = torch.repeat_interleave(torch.arange(form.rows, device=W.device), sp.rowptr.diff())
        W.index_put_((r, sp.col.long()), sp.values(), accumulate=True)
    return W[:, :form.cols]


def _device(form: KernelForm) -> torch.device:
    return form.parts[0].perm.device if form.parts else form.sparse.col.device


def part_inputs(part: BitPart, x: Tensor) -> Tensor:
    """x versions xv (N, V, P) fp32 of x (N, cols)."""
    xp = torch.cat([x.float(), x.new_zeros(x.shape[0], 1, dtype=torch.float32)], dim=1)
    xp = xp.index_select(1, torch.where(part.perm >= 0, part.perm, x.shape[1]))  # (N, P)
    return xp[:, None, :] if part.scale is None else xp[:, None, :] * part.scale[None]


def form_matmul_torch(form: KernelForm, x: Tensor, row_chunk: int = 1024) -> Tensor:
    """y = x Ŵᵀ (N, rows) fp32 from the form with plain PyTorch ops (x: (N, cols))."""
    N = x.shape[0]
    y = torch.zeros(N, form.rows, device=x.device)
    for part in form.parts:
        xv = part_inputs(part, x)  # (N, V, P)
        for r0 in range(0, form.rows, row_chunk):
            rows = slice(r0, min(r0 + row_chunk, form.rows))
            for v in range(xv.shape[1]):
                y[:, rows] += xv[:, v] @ _part_dense(part, rows, v).T
    if form.sparse is not None:
        sp = form.sparse
        r = torch.repeat_interleave(torch.arange(form.rows, device=x.device), sp.rowptr.diff())
        contrib = x.float()[:, sp.col.long()] * sp.values()[None]  # (N, n)
        y.index_add_(1, r, contrib)
    return y
