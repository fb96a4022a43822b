"""ARB-LLM (Li et al. 2025): alternating refined binarization on BiLLM's masks.

Per block of B columns (ARB-LLM, Li et al. 2025, and its reference code), with s and x as in BiLLM
(`billm.py`):

    S_sal  = BiLLM's salient-column search (R₂ on x, MSE)
    CGB    (optional) split S_sal by |s| into large and small (81 quantiles of the non-zero
           |s| in the salient columns, R₂ on x, MSE)                                   §4.5
    split  the rest into sparse {|s| ≥ p} and concentrated {|s| < p} (81 quantiles, R₁ on x);
           error = ‖x − Ŵ‖² (ARB, ARB-RC) or tr(E S Eᵀ), E = x − Ŵ, S = H_blk/2 (ARB-X),
           Ŵ including the salient part approximated by the method's own order-2 routine
    num_p  repeats the split P times on what is left (P sparse groups); the running best
           error is not reset between rounds (the reference's behaviour)
    Ŵ_blk  each group binarized on W by the method's kernels (`arb_refine`): order 2 for
           salient groups, order 1 for the others

| method | order-1 / order-2 kernel   | codes                                   |
|--------|----------------------------|-----------------------------------------|
| arb    | arb1 / arb2                | α (rows) per order, μ (rows) per group  |
| arb-x  | arb_x1 / arb_x2 with S     | same                                    |
| arb-rc | rc1 / rc2 (no mean)        | a_r (rows) → alpha, a_c (B) → beta      |

| symbol | meaning                                              | shape      |
|--------|------------------------------------------------------|------------|
| W      | block of weights after feedback                      | (rows, B)  |
| s, x   | saliency; matrix the searches measure error on       | (rows, B)  |
| S      | block Gram matrix of the inputs, ctx.H / 2            | (B, B)     |
| p      | split threshold on |s|                              | scalar     |

Group ids in the codes: salient groups first (CGB: large₁ … large_P, small), then the
non-salient ones (sparse₁ … sparse_P, concentrated).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from . import arb_refine
from .base import BlockContext, MethodArgumentError, ScaleRounding
from .billm import (
    BlockCodesMethod,
    binary_codes,
    check_search_args,
    search_salient,
    search_split,
    split_masks,
)
from .bra import first_min, quantiles, residual_binarize, split_params
from .codes import BinaryCodes, ScaleDtype

_X_CHUNK = 1 << 19  # elements per candidate chunk of the ARB-X split error


@dataclass(frozen=True)
class ARBArgs:
    """ARB-LLM's options; defaults reproduce the reference code (ARB-LLM's repository).

    salient_metric, hessian_diag, search_target, split_on, up_lim: as BiLLM (`BiLLMArgs`)
    iters  alternating iterations of the kernels (T = 15, fixed in the reference)
    cgb    column-group bitmap: split the salient columns in two (ARB-LLM_X / _RC)
    num_p  rounds of the magnitude split (P + 1 non-salient groups, with CGB also P + 1
           salient groups)
    intra_block  as BiLLM: GPTQ-style updates inside the block (§8.1); off in the reference
    scale_dtype, scale_rounding  as BiLLM: storage precision of α, μ, β and when they are
                 rounded to it ("after" the layer, the reference's fp32 loop, or "in_loop")
    scale_codes, superblock_rows, block  as BiLLM: 8-bit α/μ codes ("q8"), rows per fp16
                 super-scale, columns per block (0: the run's block size)
    """

    salient_metric: Literal["hessian", "magnitude"] = "hessian"
    hessian_diag: Literal["cholesky", "inverse"] = "cholesky"
    search_target: Literal["saliency", "weight"] = "saliency"
    split_on: Literal["saliency", "weight"] = "saliency"
    up_lim: int = 50
    iters: int = 15
    cgb: bool = False
    num_p: int = 1
    intra_block: bool = False
    scale_dtype: ScaleDtype = "float16"
    scale_rounding: ScaleRounding = "after"
    scale_codes: Literal["float", "q8"] = "float"
    superblock_rows: int = 256
    block: int = 0


@dataclass(frozen=True)
class ARBXArgs(ARBArgs):
    """ARB-X adds the calibration-aware iterations run after the weight-space ones.

    x_iters       X-space (μ, α) iterations with the signs fixed (15)
    x_warm_iters  weight-space ARB iterations before them inside ARB-X's kernel; None = `iters`
                  (the reference); 0 = X-space steps straight from the BiLLM init, as the
                  paper's figure draws it. The mask search always uses `iters`.
    """

    x_iters: int = 15
    x_warm_iters: int | None = None


class GroupFit(NamedTuple):
    """One group's binarization: alpha (order, rows), mu (rows,) or None, signs (order, rows, B)
    bool, beta (order, B) column scales or None."""

    alpha: Tensor
    mu: Tensor | None
    signs: Tensor
    beta: Tensor | None

    def approx(self, mask: Tensor) -> Tensor:
        """Ŵ of the group (rows, B), zero outside the mask."""
        pm = self.signs.to(torch.float32) * 2 - 1  # (order, rows, B)
        terms = self.alpha[:, :, None] * pm  # (order, rows, B)
        if self.beta is not None:
            terms = terms * self.beta[:, None, :]
        out = terms.sum(0) + (self.mu[:, None] if self.mu is not None else 0)
        return out * mask


def on_columns(kernel, W: Tensor, mask: Tensor, order: int, S: Tensor | None) -> GroupFit:
    """kernel(W, mask, order, S) on only the columns the group touches, expanded back to B.

    Row statistics only see masked entries, column scales only masked columns and ARB-X only
    S restricted to them, so the result is the same; salient groups shrink to a few columns.
    """
    used = mask.any(0)  # (B,)
    if bool(used.all()) or not bool(used.any()):
        return kernel(W, mask, order, S)
    idx = torch.nonzero(used).flatten()  # (c,)
    f = kernel(W[:, idx], mask[:, idx], order, None if S is None else S[idx][:, idx])
    signs = torch.zeros(f.signs.shape[0], *W.shape, dtype=torch.bool, device=W.device)
    signs[:, :, idx] = f.signs  # (order, rows, B)
    beta = None
    if f.beta is not None:
        beta = torch.ones(f.beta.shape[0], W.shape[1], device=W.device)
        beta[:, idx] = f.beta  # (order, B)
    return GroupFit(f.alpha, f.mu, signs, beta)


class ARB(BlockCodesMethod):
    """ARB: first/second-order alternating refinement of (μ, α, B), §4.1–4.2."""

    name = "arb"
    Args = ARBArgs
    needs_gram = False  # whether the method uses S = H_blk/2 (ARB-X)

    def __init__(self, args: ARBArgs):
        check_search_args(args)
        if args.num_p < 1:
            raise MethodArgumentError(f"num_p={args.num_p}: use at least one split round")
        for key in ("iters", "x_iters", "x_warm_iters"):
            value = getattr(args, key, None)
            if value is not None and value < 0:
                raise MethodArgumentError(f"{key}={value}: use a non-negative iteration count")
        super().__init__(args)

    # -- the method's kernels (overridden by ARB-X and ARB-RC) ---------------------------
    def binarize(self, W: Tensor, mask: Tensor, order: int, S: Tensor) -> GroupFit:
        """Binarize the group `mask` of W with the method's own kernel of `order`."""
        if order == 1:
            a, mu, sg = arb_refine.arb1(W, mask, self.args.iters)
            return GroupFit(a[None], mu, sg[None], None)
        a, mu, sg = arb_refine.arb2(W, mask, self.args.iters)
        return GroupFit(a, mu, sg, None)

    def search_approx(self, x: Tensor, mask: Tensor, order: int) -> Tensor:
        """The approximation the mask search adds for fixed groups (salient: order 2; the
        chosen sparse group of each round: order 1), as the reference's search does."""
        return on_columns(self.binarize, x, mask, order, None).approx(mask)

    def split_errors(self, x, s, region, fixed, S, best):
        """The non-salient split of `region`: (p, error, improved), MSE against x."""
        if fixed is None:
            return search_split(x, s, region, order=1, best=best)
        base = float(((x - fixed) ** 2 * ~region).sum(dtype=torch.float64))
        return search_split(x, s, region, order=1, base=base, best=best)

    def needs_fixed(self) -> bool:
        """Whether the split errors depend on the fixed part's approximation (not only through a
        constant): always with num_p > 1 (the running best carries over rounds)."""
        return self.args.num_p > 1

    # -- the mask search of §4.4b / §4.5 ---------------------------------------------------
    def search_masks(self, x: Tensor, s: Tensor, sal: Tensor, S: Tensor,
                     t: Tensor | None = None):
        """(salient group masks, non-salient group masks), each a list of (rows, B) bool.

        t: what the non-salient break-points split (default s; W with split_on="weight")."""
        t = s if t is None else t
        P = self.args.num_p
        sal_masks = self._cgb(x, s, sal) if self.args.cgb else [sal]
        taken = sal.clone()  # salient ∪ sparse groups chosen so far
        fixed = self.search_approx(x, sal, 2) if self.needs_fixed() else None
        rest, best, small = [], float("inf"), None
        for _ in range(P):
            region = ~taken
            p, best, _ = self.split_errors(x, t, region, fixed, S, best)
            large, small = split_masks(t, region, p)
            rest.append(large)
            taken |= large
            if fixed is not None:
                fixed = fixed + self.search_approx(x, large, 1)
        return sal_masks, rest + [small]

    def _cgb(self, x: Tensor, s: Tensor, sal: Tensor) -> list[Tensor]:
        """CGB (§4.5): split the salient columns by |s| (R₂ on x, MSE), num_p rounds."""
        left = sal.clone()
        group0 = torch.zeros_like(x) if self.args.num_p > 1 else None
        out, best, small = [], float("inf"), None
        for _ in range(self.args.num_p):
            base = (float(((x - group0) ** 2 * ~left).sum(dtype=torch.float64))
                    if group0 is not None else 0.0)
            p, best, _ = search_split(x, s, left, order=2, base=base, best=best, nonzero=True)
            large, small = split_masks(s, left, p)
            out.append(large)
            left &= ~large
            if group0 is not None:
                group0 = group0 + residual_binarize(x, large, 2).approx
        return out + [small]

    # -- fit --------------------------------------------------------------------------------
    def fit(self, W: Tensor, ctx: BlockContext) -> BinaryCodes:
        if self.needs_gram and ctx.H is None:
            raise MethodArgumentError(f"{self.name} needs the layer's Hessian (calibration data)")
        s, x = self.targets(W, ctx)
        cols = search_salient(x, s, self.args.up_lim)  # (B,)
        sal = cols[None, :].expand_as(W).clone()  # (rows, B)
        S = ctx.H / 2 if ctx.H is not None else None  # (B, B): mean XᵀX of the block
        t = s if self.args.split_on == "saliency" else W  # what the break-points split
        sal_masks, rest = self.search_masks(x, s, sal, S, t)
        masks = sal_masks + rest
        orders = [2] * len(sal_masks) + [1] * len(rest)
        fits = [on_columns(self.binarize, W, m, o, S) for m, o in zip(masks, orders)]
        beta = [f.beta for f in fits] if fits[0].beta is not None else None
        return binary_codes(masks, orders, [f.alpha for f in fits], [f.mu for f in fits],
                            [f.signs for f in fits], cols, n_salient=len(sal_masks), beta=beta,
                            scale_dtype=self.loop_dtype, q8_rows=self.q8_rows)


class ARBX(ARB):
    """ARB-X: ARB, then calibration-aware (μ, α) with signs fixed, error tr(E S Eᵀ), §4.3."""

    name = "arb-x"
    Args = ARBXArgs
    needs_gram = True

    def binarize(self, W: Tensor, mask: Tensor, order: int, S: Tensor) -> GroupFit:
        kernel = arb_refine.arb_x1 if order == 1 else arb_refine.arb_x2
        warm = self.args.iters if self.args.x_warm_iters is None else self.args.x_warm_iters
        a, mu, sg = kernel(W, mask, S, iters=self.args.x_iters, arb_iters=warm)
        return GroupFit(a[None], mu, sg[None], None) if order == 1 else GroupFit(a, mu, sg, None)

    def search_approx(self, x: Tensor, mask: Tensor, order: int) -> Tensor:
        weight_space = functools.partial(ARB.binarize, self)  # as the reference's search
        return on_columns(weight_space, x, mask, order, None).approx(mask)

    def needs_fixed(self) -> bool:
        return True

    def split_errors(self, x, s, region, fixed, S, best):
        vals = (s * region).abs().reshape(-1)
        p = quantiles(vals)
        errs = x_split_errors(x, s, region, p, fixed, S)
        i = first_min(errs, best)
        return (p[0], best, False) if i is None else (p[i], float(errs[i]), True)


class ARBRC(ARB):
    """ARB-RC: row and column scales, no mean, §4.4."""

    name = "arb-rc"
    Args = ARBArgs

    def binarize(self, W: Tensor, mask: Tensor, order: int, S: Tensor, iters: int | None = None):
        kernel = arb_refine.rc1 if order == 1 else arb_refine.rc2
        a_r, a_c, sg = kernel(W, mask, self.args.iters if iters is None else iters)
        if order == 1:
            return GroupFit(a_r[None], None, sg[None], a_c[None])
        return GroupFit(a_r, None, sg, a_c)

    def search_approx(self, x: Tensor, mask: Tensor, order: int) -> Tensor:
        # the reference adds the sparse group's RC order-1 init (0 iterations), §4.4b
        kernel = functools.partial(self.binarize, iters=None if order == 2 else 0)
        return on_columns(kernel, x, mask, order, None).approx(mask)


def x_split_errors(x: Tensor, s: Tensor, region: Tensor, p: Tensor, fixed: Tensor,
                   S: Tensor) -> Tensor:
    """tr(E S Eᵀ) per candidate p, E = x − fixed − R₁(x; small) − R₁(x; large) (§4.3).

    small = region ∩ {|s| < p}, large = region ∩ {|s| ≥ p}; `fixed` is zero on the region.
    The first-order (μ, α) of both parts come in closed form from sorted statistics when x
    is s (`split_params`), else from BRA on candidate masks; then one (rows, B)·(B, B)
    product per candidate. Returns (ncand,) float64.
    """
    S = (S + S.T) / 2
    A = x - fixed  # (rows, B)
    R = region.to(x.dtype)  # (rows, B)
    absx = s.abs()
    params = split_params(x, region, p) if x is s else None  # 4 × (rows, ncand)
    per = max(1, _X_CHUNK // x.numel())
    out = []
    for i in range(0, p.numel(), per):
        pc = p[i:i + per]  # (c,)
        small = absx[None] < pc[:, None, None]  # (c, rows, B)
        if params is not None:
            # (c, rows, 1) each
            mu_s, a_s, mu_l, a_l = (t[:, i:i + per].T.float()[:, :, None] for t in params)
            N = torch.where(small, torch.addcmul(mu_s - a_s, x >= mu_s, 2 * a_s),  # μ ± α
                            torch.addcmul(mu_l - a_l, x >= mu_l, 2 * a_l))  # (c, rows, B)
        else:
            xe = x.expand_as(small)
            N = (residual_binarize(xe, small & region, 1).approx
                 + residual_binarize(xe, region & ~small, 1).approx)
        E = torch.addcmul(A, N, R, value=-1)  # (c, rows, B)
        out.append(((E @ S) * E).sum((1, 2)).double())  # fp32 pairwise sums of E S Eᵀ
    return torch.cat(out)
