"""Reference evaluation of the kernel form (`binllm.kernels.form`): plain PyTorch, no kernels.

`form_dense(form)` rebuilds Ŵ (a test oracle); `form_matmul_torch(form, x)` is the pure-PyTorch
product (the fallback of `binllm.kernels.cpu`); `part_inputs` the x versions of a BitPart;
`plane_rows` reads a plane's rows back from the 16-row tiled layout; `tile_planes` makes it;
`stages_of` lists a chain's stages (a ChainForm: kernels run them in turn).
Duck-typed on the form's dataclasses (this module imports nothing from `form`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..packed.packing import unpack_bits

TILE = 16  # rows per tile of the planes' layout


def tile_planes(planes: Tensor) -> Tensor:
    """(NP, rows, PB) row-major plane bytes → (⌈rows/16⌉, NP, PB, 16): per row tile, plane and
    byte column, the tile's 16 rows' bytes contiguous (rows padded with zero bytes)."""
    NP, rows, PB = planes.shape
    nt = -(-rows // TILE)
    padded = torch.zeros(NP, nt * TILE, PB, dtype=planes.dtype, device=planes.device)
    padded[:, :rows] = planes
    return padded.reshape(NP, nt, TILE, PB).permute(1, 0, 3, 2).contiguous()


def plane_rows(planes: Tensor, k: int, rows: slice, nrows: int) -> Tensor:
    """Bytes (n, PB) of plane k at rows `rows` (of nrows) from the tiled layout."""
    nt, _, PB, _ = planes.shape
    return planes[:, k].permute(0, 2, 1).reshape(nt * TILE, PB)[:nrows][rows]


def _term_bits(part, t: int, rows: slice, n: int) -> Tensor | None:
    """B_t (n, P) {0, 1} fp32 at `rows`, or None for a constant term (B = 1)."""
    p1, p2 = int(part.terms[t, 0]), int(part.terms[t, 1])
    if p1 < 0:
        return None
    byts = plane_rows(part.planes, p1, rows, part.rows)
    if p2 >= 0:
        byts = byts & plane_rows(part.planes, p2, rows, part.rows)
    return unpack_bits(byts, part.width).float()


def term_coef(part, t: int) -> Tensor:
    """C_t (nseg, rows) fp32: Σ fac · coef over the term's entries."""
    k = slice(int(part.cptr[t]), int(part.cptr[t + 1]))
    return (part.fac[k, None, None] * part.coef[part.cidx[k]].float()).sum(0)


def _part_dense(part, rows: slice, v: int) -> Tensor:
    """Rows `rows` of part's weight over its P columns for x version v (n, P) fp32."""
    nseg = part.seg.shape[0] - 1
    seg_of = torch.repeat_interleave(torch.arange(nseg, device=part.perm.device),
                                     part.seg.diff() * 8)  # (P,)
    n = len(range(part.rows)[rows])
    W = torch.zeros(n, part.width, device=part.perm.device)
    for t in range(part.terms.shape[0]):
        if int(part.terms[t, 2]) != v:
            continue
        c = term_coef(part, t)[:, rows].T  # (n, nseg)
        bits = _term_bits(part, t, rows, n)
        W += c[:, seg_of] if bits is None else c[:, seg_of] * bits
    return W


def _versions(part) -> int:
    return 1 if part.scale is None else part.scale.shape[0]


def stages_of(form) -> tuple:
    """The one-map forms a chain applies in turn (a ChainForm's stages), or (form,)."""
    return tuple(getattr(form, "stages", None) or (form,))


def form_dense(form) -> Tensor:
    """Ŵ (rows, cols) fp32 rebuilt from the form (a test oracle; the kernels never do this);
    a chain's Ŵ is the product of its stages' (Ŵ_k ⋯ Ŵ_1)."""
    if len(stages_of(form)) > 1:
        W = None
        for stage in stages_of(form):
            Ws = form_dense(stage)
            W = Ws if W is None else Ws @ W
        return W
    W = torch.zeros(form.rows, form.cols + 1, device=_device(form))
    for part in form.parts:
        idx = torch.where(part.perm >= 0, part.perm, form.cols)
        for v in range(_versions(part)):
            Wv = _part_dense(part, slice(None), v)
            if part.scale is not None:
                Wv = Wv * part.scale[v]
            W.index_add_(1, idx, Wv)
    if form.sparse is not None:
        sp = form.sparse
        r = torch.repeat_interleave(torch.arange(form.rows, device=W.device), sp.rowptr.diff())
        W.index_put_((r, sp.col.long()), sp.values(), accumulate=True)
    return W[:, :form.cols]


def _device(form) -> torch.device:
    return form.parts[0].perm.device if form.parts else form.sparse.col.device


def part_inputs(part, x: Tensor) -> Tensor:
    """x versions xv (N, V, P) fp32 of x (N, cols)."""
    xp = torch.cat([x.float(), x.new_zeros(x.shape[0], 1, dtype=torch.float32)], dim=1)
    xp = xp.index_select(1, torch.where(part.perm >= 0, part.perm, x.shape[1]))  # (N, P)
    return xp[:, None, :] if part.scale is None else xp[:, None, :] * part.scale[None]


def form_matmul_torch(form, x: Tensor, row_chunk: int = 1024) -> Tensor:
    """y = x Ŵᵀ (N, rows) fp32 from the form with plain PyTorch ops (x: (N, cols)); a chain's
    stages one after the other."""
    if len(stages_of(form)) > 1:
        for stage in stages_of(form):
            x = form_matmul_torch(stage, x, row_chunk)
        return x
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
