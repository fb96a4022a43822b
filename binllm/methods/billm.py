"""BiLLM (Huang et al. 2024): salient columns at second order, bell-shaped split of the rest.

Per block of B columns, on the block W after error feedback from earlier blocks (§3.2):

    s   = W² / d²  (d_j = U_jj, "hessian")  or  s = W  ("magnitude")       saliency
    k*  = argmin_k  ‖x − R₂(x; S_k) − R₂(x; ¬S_k)‖²   S_k = top-k columns by Σ_i |s_ij|
    p*  = argmin_p  ‖x − R₂(x; S) − R₁(x; G₁(p)) − R₁(x; G₂(p))‖²
          G₁ = ¬S ∩ {|s| < p} (concentrated), G₂ = ¬S ∩ {|s| ≥ p} (sparse),
          p over the 81 quantiles linspace(0.1, 0.9, 81) of |s ⊙ ¬S| (whole block, zeros kept)
    Ŵ   = R₂(W; S) + R₁(W; G₂) + R₁(W; G₁)                                 orders (2, 1, 1)

x is s (the reference; `search_target="saliency"`) or W (`"weight"`). The block is binarized
at once; only later blocks are compensated (`feedback = "block"`, §3.3).

| symbol | meaning                                              | shape      |
|--------|------------------------------------------------------|------------|
| W      | block of weights after feedback                      | (rows, B)  |
| U      | block of the upper Cholesky factor of the damped H⁻¹  | (B, B)     |
| d      | per-column Hessian scale in the saliency             | (B,)       |
| s      | saliency matrix                                      | (rows, B)  |
| S      | salient columns                                      | (B,) bool  |
| α, μ   | per-row scales and means of each group and order     | (rows,)    |

Group ids in the codes: 0 = salient, 1 = sparse, 2 = concentrated (as BiLLM's reference code
numbers them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from .base import BlockContext, Method, MethodArgumentError, ScaleRounding
from .bra import first_min, quantiles, residual_binarize, salient_columns, split_errors
from .codes import BinaryCodes, ScaleDtype, q8_round, to_storage

_BRUTE_CHUNK = 1 << 22  # elements per candidate chunk of the brute-force split search


@dataclass(frozen=True)
class BiLLMArgs:
    """BiLLM's options; the defaults reproduce the reference code (BiLLM's repository).

    salient_metric  "hessian": s = W²/d² (README runs); "magnitude": s = W (the CLI default)
    hessian_diag    "cholesky": d_j = U_jj, the reference's Cholesky diagonal (§8.2);
                    "inverse": d_j = [H⁻¹]_jj as the paper writes
    search_target   "saliency": both searches measure error on s (reference, §8.2);
                    "weight": on W (slower split search, evaluated candidate by candidate mask)
    split_on        "saliency": the break-point splits |s| of the non-salient weights (the
                    reference with the hessian metric, §3.4); "weight": it splits |W|, as the
                    paper describes (s = W with the magnitude metric: both are the same)
    up_lim          salient-column candidates (top columns by score), clamped to the block
    order_salient   residual order of the salient columns (2)
    order_rest      order of the concentrated and sparse groups (1)
    intra_block     False: the block is binarized at once and only later blocks are compensated
                    (reference, §8.1); True: GPTQ-style updates inside the block, each column
                    rounded to the nearest level of the grid fitted at block start
    scale_dtype     storage precision of α, μ: "float16" (default) or "float32" (no rounding)
    scale_rounding  "after": α, μ stay fp32 in the loop, as the reference, and are rounded to
                    scale_dtype once the layer is done; "in_loop": rounded before Ŵ and the
                    feedback (a named option, docs/methods.md)
    scale_codes     "float": α, μ stored at scale_dtype (16 bits each); "q8": 8-bit codes with
                    one fp16 super-scale per `superblock_rows` rows of each block (k-quants'
                    sub-block scales, `codes.q8_round`), rounded at block fit time, so Ŵ and the
                    error feedback use the stored values
    superblock_rows rows sharing one fp16 super-scale with scale_codes=q8 (256)
    block           columns per block, i.e. per α/μ and per feedback step; 0 = the run's
                    block size (--block-size, 128)
    """

    salient_metric: Literal["hessian", "magnitude"] = "hessian"
    hessian_diag: Literal["cholesky", "inverse"] = "cholesky"
    search_target: Literal["saliency", "weight"] = "saliency"
    split_on: Literal["saliency", "weight"] = "saliency"
    up_lim: int = 50
    order_salient: int = 2
    order_rest: int = 1
    intra_block: bool = False
    scale_dtype: ScaleDtype = "float16"
    scale_rounding: ScaleRounding = "after"
    scale_codes: Literal["float", "q8"] = "float"
    superblock_rows: int = 256
    block: int = 0


def check_search_args(args) -> None:
    if args.up_lim < 1:
        raise MethodArgumentError(f"up_lim={args.up_lim}: use at least 1 salient-column candidate")
    if args.superblock_rows < 1:
        raise MethodArgumentError(f"superblock_rows={args.superblock_rows}: use at least 1 row")
    if args.block < 0:
        raise MethodArgumentError(f"block={args.block}: use a positive number of columns, or 0 "
                                  "for the run's block size")


# -- saliency and searches shared with ARB-LLM -------------------------------------------
def inverse_diag(U: Tensor) -> Tensor:
    """diag(H⁻¹) = diag(UᵀU) = column sums of U², for the whole layer (cols,)."""
    return (U * U).sum(0)


def block_saliency(W: Tensor, ctx: BlockContext, metric: str, hessian_diag: str) -> Tensor:
    """s (rows, B): W²/d² with d = diag U ("cholesky") or diag H⁻¹ ("inverse"), or W itself."""
    if metric == "magnitude":
        return W
    if hessian_diag == "inverse":
        d = ctx.state[ctx.columns]  # (B,) from prepare()
    else:
        if ctx.U is None:
            raise MethodArgumentError("salient_metric=hessian needs a Hessian; calibrate the "
                                      "layer or use salient_metric=magnitude")
        d = torch.diag(ctx.U)  # (B,)
    return W ** 2 / (d ** 2)[None, :]


def search_salient(x: Tensor, s: Tensor, up_lim: int) -> Tensor:
    """Salient columns (B,) bool: BiLLM's count search on x, candidates ranked by Σ_i |s_ij|."""
    cols, _ = salient_columns(x, s.abs().sum(0), up_lim)
    return cols


def candidate_errors(x: Tensor, s: Tensor, region: Tensor, p: Tensor, order: int) -> Tensor:
    """Σ-error on `region` of BRA-`order` on both parts {|s| < p}, {|s| ≥ p}, per candidate p.

    Closed form on sorted values when x is s; otherwise candidate masks in chunks.
    """
    if x is s:
        return split_errors(x, region, p, order)
    out = []
    per = max(1, _BRUTE_CHUNK // x.numel())
    for i in range(0, p.numel(), per):
        small = region & (s.abs()[None] < p[i:i + per, None, None])  # (c, rows, B)
        err = 0
        for m in (small, region & ~small):
            A = residual_binarize(x.expand_as(m), m, order).approx
            err = err + (((x - A) ** 2) * m).sum((1, 2), dtype=torch.float64)
        out.append(err)
    return torch.cat(out)


def split_masks(s: Tensor, region: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """(large, small) = region ∩ {|s| ≥ p}, region ∩ {|s| < p}."""
    small = region & (s.abs() < p)
    return region & ~small, small


def search_split(x: Tensor, s: Tensor, region: Tensor, order: int, base: float = 0.0,
                 best: float = float("inf"), nonzero: bool = False):
    """The 81-candidate split of `region` (§3.2.3 / §4.5); returns (p, error, improved).

    Candidates are quantiles of |s ⊙ region| over the whole block (of its non-zero values
    when `nonzero`, as CGB). error = base + Σ-error of both parts; the first candidate with the
    smallest error wins if it is strictly below `best`, else the first candidate is used
    with improved = False (the reference's fallback).
    """
    vals = (s * region).abs().reshape(-1)
    p = quantiles(vals[vals != 0] if nonzero else vals)
    errs = candidate_errors(x, s, region, p, order) + base
    i = first_min(errs, best)
    return (p[0], best, False) if i is None else (p[i], float(errs[i]), True)


# -- codes --------------------------------------------------------------------------------
def binary_codes(masks: list[Tensor], orders: list[int], alpha: list[Tensor],
                 mu: list[Tensor | None],
                 signs: list[Tensor], salient_cols: Tensor, n_salient: int,
                 beta: list[Tensor] | None = None,
                 scale_dtype: ScaleDtype = "float16", q8_rows: int = 0) -> BinaryCodes:
    """One block's BinaryCodes from disjoint group masks (rows, B) covering the block.

    alpha[g]: (order_g, rows); mu[g]: (rows,) or None; signs[g]: (order_g, rows, B) bool;
    beta[g]: (order_g, B) column scales (ARB-RC). Scales are rounded to `scale_dtype` here, or
    α and μ to 8-bit codes with an fp16 super-scale per q8_rows rows (q8_rows > 0).
    """
    rows, B = masks[0].shape
    K = max(orders)
    G = len(masks)
    dev = masks[0].device
    group = torch.zeros(rows, B, dtype=torch.uint8, device=dev)
    planes = torch.zeros(K, rows, B, dtype=torch.bool, device=dev)
    A = torch.zeros(G, K, rows, 1, device=dev)
    M = torch.zeros(G, rows, 1, device=dev)
    Bc = torch.ones(G, K, B, device=dev) if beta is not None else None
    for g, m in enumerate(masks):
        group[m] = g
        planes[:orders[g]] |= signs[g] & m
        A[g, :orders[g], :, 0] = alpha[g]
        if mu[g] is not None:
            M[g, :, 0] = mu[g]
        if beta is not None:
            Bc[g, :orders[g]] = beta[g]
    def store(x: Tensor) -> Tensor:  # (..., rows, 1)
        return q8_round(x, q8_rows) if q8_rows else to_storage(x, scale_dtype)

    return BinaryCodes(group=group, signs=planes, alpha=store(A),
                       mu=None if beta is not None else store(M),
                       beta=None if Bc is None else to_storage(Bc, scale_dtype),
                       salient_cols=salient_cols, orders=tuple(orders), n_salient=n_salient,
                       block_size=B, scale_dtype=scale_dtype, q8_rows=q8_rows)


def nearest_signs(W: Tensor, grid: BinaryCodes, cols: slice) -> Tensor:
    """Signs (K, rows, c) of the grid level nearest to each weight of W (rows, c).

    Order 1: μ ± c₁; order 2: the nearest of μ ± c₁ ± c₂ (ties to the first of −−, −+, +−,
    ++), with c_o = α_o (· β_o for column scales) of the weight's group.
    """
    g = grid.group[:, cols].long()  # (rows, c)
    r = torch.arange(W.shape[0], device=W.device)[:, None]  # (rows, 1)
    c = grid.alpha[g, :, r, 0]  # (rows, c, K)
    if grid.beta is not None:
        j = torch.arange(cols.start, cols.stop, device=W.device)[None, :]  # (1, c)
        c = c * grid.beta[g, :, j]  # (rows, c, K)
    d = W - grid.mu[g, r, 0] if grid.mu is not None else W  # (rows, c)
    first = d * c[..., 0] >= 0  # order 1: the side of μ
    if c.shape[-1] == 1:
        return first[None]
    c1, c2 = c[..., 0], c[..., 1]
    levels = torch.stack([-c1 - c2, -c1 + c2, c1 - c2, c1 + c2], -1)  # (rows, c, 4)
    idx = (d[..., None] - levels).abs().argmin(-1)  # (rows, c)
    two = torch.tensor(grid.orders, device=W.device)[g] == 2  # (rows, c)
    return torch.stack([torch.where(two, idx >= 2, first), two & (idx % 2 == 1)])


class BlockCodesMethod(Method):
    """Shared plumbing of methods whose `fit` returns a block's BinaryCodes."""

    feedback = "block"

    def prepare(self, W: Tensor, H: Tensor | None, U: Tensor | None, *,
                original: Tensor | None = None):
        a = self.args
        if a.salient_metric == "hessian" and a.hessian_diag == "inverse":
            if U is None:
                raise MethodArgumentError("hessian_diag=inverse needs a Hessian")
            return inverse_diag(U)
        return None

    def __init__(self, args):
        super().__init__(args)
        if args.intra_block:  # §8.1 as an option: GPTQ's column loop on the block's grid
            self.feedback = "column"

    def block_size(self, default: int, cols: int) -> int:
        return self.args.block or default

    @property
    def q8_rows(self) -> int:
        """Rows per fp16 super-scale of the 8-bit α/μ codes; 0 = α, μ stored as floats."""
        return self.args.superblock_rows if self.args.scale_codes == "q8" else 0

    def round(self, W: Tensor, grid: BinaryCodes, cols: slice) -> Tensor:
        if self.args.intra_block:
            return nearest_signs(W, grid, cols)  # (K, rows, c)
        return grid.signs[:, :, cols]  # (K, rows, c): the fit's own signs

    def dequantize(self, grid: BinaryCodes, levels: Tensor, cols: slice) -> Tensor:
        part = replace(grid, group=grid.group[:, cols], signs=levels,
                       beta=None if grid.beta is None else grid.beta[..., cols],
                       salient_cols=grid.salient_cols[cols])
        return part.dequantize()  # (rows, c)

    def codes(self, grids: list[BinaryCodes], levels: Tensor) -> BinaryCodes:
        return replace(BinaryCodes.cat(grids), signs=levels)

    def targets(self, W: Tensor, ctx: BlockContext) -> tuple[Tensor, Tensor]:
        """(s, x): the saliency and the matrix the searches measure error on."""
        a = self.args
        s = block_saliency(W, ctx, a.salient_metric, a.hessian_diag)
        return s, (s if a.search_target == "saliency" or s is W else W)


class BiLLM(BlockCodesMethod):
    name = "billm"
    Args = BiLLMArgs

    def __init__(self, args: BiLLMArgs):
        check_search_args(args)
        if not (1 <= args.order_salient <= 2 and 1 <= args.order_rest <= 2):
            raise MethodArgumentError("order_salient and order_rest must be 1 or 2")
        super().__init__(args)

    def fit(self, W: Tensor, ctx: BlockContext) -> BinaryCodes:
        a = self.args
        s, x = self.targets(W, ctx)
        cols = search_salient(x, s, a.up_lim)  # (B,)
        sal = cols[None, :].expand_as(W)  # (rows, B)
        t = s if a.split_on == "saliency" else W  # what the break-point splits
        p, _, _ = search_split(x, t, ~sal, order=a.order_rest)
        sparse, concentrated = split_masks(t, ~sal, p)
        masks, orders = [sal, sparse, concentrated], [a.order_salient, a.order_rest, a.order_rest]
        fits = [residual_binarize(W, m, o) for m, o in zip(masks, orders)]
        return binary_codes(masks, orders, [f.alpha for f in fits], [f.mu for f in fits],
                            [f.signs for f in fits], cols, n_salient=1,
                            scale_dtype=self.loop_dtype, q8_rows=self.q8_rows)
