"""The kernel form's data types and the builder of a BitPart (`binllm.kernels.form` explains the
form; this module holds its parts).

`BitPart`, `SparsePart` and `KernelForm` are one linear map y = Ŵx; `ChainForm` is a product
of such maps, y = Ŵ_k(… Ŵ_1(x)), for codes that are a product of matrices (binary-factor:
Ŵ = diag(s_out) S_U · S_Vᵀ diag(s_in), two one-plane forms in sequence). `PartBuilder`
collects a part's terms from plane thunks and coefficient arrays and builds the BitPart.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from ..packed.packing import pack_bits
from .form_ref import tile_planes

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
    in_order: bool = False  # perm is 0 … k − 1, then −1 padding: x's first k columns, in order

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


@dataclass(frozen=True)
class ChainForm:
    """Ŵ (rows, cols) = Ŵ_k ⋯ Ŵ_1: y = stage_k(… stage_1(x)), each stage a KernelForm whose
    cols are the previous stage's rows (the intermediate vector stays fp32)."""

    rows: int
    cols: int
    stages: tuple[KernelForm, ...]

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in self.stages)

    def to(self, device) -> ChainForm:
        return replace(self, stages=tuple(f.to(device) for f in self.stages))


# -- building a BitPart ---------------------------------------------------------------------
def _in_order(perm: Tensor) -> bool:
    """Whether perm (P,) is 0 … k − 1 followed only by padding (−1): the columns in place."""
    k = int((perm >= 0).sum())
    return torch.equal(perm[:k], torch.arange(k)) and bool((perm[k:] < 0).all())


def segments(columns: list[Tensor], device) -> tuple[Tensor, Tensor]:
    """perm (P,) and seg (nseg + 1,) byte offsets from each segment's column indices."""
    perm, seg = [], [0]
    for c in columns:
        pad = -c.numel() % CHUNK
        perm += [c.long(), torch.full((pad,), -1, dtype=torch.long, device=device)]
        seg.append(seg[-1] + (c.numel() + pad) // 8)
    return torch.cat(perm), torch.tensor(seg, dtype=torch.long, device=device)


def share(arrays: list[Tensor]) -> tuple[list[Tensor], list[tuple[int, float]]]:
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


class PartBuilder:
    """Collects terms (plane keys, version key) → coefficient arrays (rows, nseg) to sum;
    plane keys () = the constant term."""

    def __init__(self, columns: list[Tensor], rows: int, device):
        self.perm, self.seg = segments(columns, device)
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
        coef, refs = share([c for cs in parts.values() for c in cs])
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
            coef=coef,
            in_order=_in_order(self.perm.cpu()))


__all__ = ["CHUNK", "FACTORS", "BitPart", "SparsePart", "KernelForm", "ChainForm", "PartBuilder",
           "segments", "share"]
