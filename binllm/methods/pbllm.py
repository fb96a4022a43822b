"""PB-LLM (PTQ, "GPTQ-PB"): unstructured salient weights at `high_bit`, the rest binarized.

PB-LLM (Shang et al. 2023) and its reference code. Once per linear, on the original W (before any
error feedback):

    σ        saliency: |W| ("magnitude") or W² / d_j² ("hessian"), d_j = U_jj (the reference's
             Cholesky diagonal, `hessian_diag="cholesky"`) or [H⁻¹]_jj = Σ_i U_ij²
             (the paper's OBS form, `hessian_diag="inverse"`)
    τ        per group of columns: the element of 0-based rank k = ⌊numel·low_frac⌋ of the
             sorted σ, low_frac = 1 − salient_fraction; salient ⇔ σ > τ (ties are binarized,
             so a group keeps numel − k − 1 salient weights when σ has no ties)
    s, z     high-bit per-row asymmetric min–max grid over the *full* row of W
    μ, α     per row and group: reference stats (§2.2, §8.4) from M = W ⊙ ¬salient averaged
             over all columns of the group (zeros included), or "masked" stats over the
             non-salient entries only

then GPTQ's column loop (intra-block feedback, §2.3) quantizes each column:

    q = s·(clamp(round(w/s) + z, 0, 2^b − 1) − z)   on salient positions
    q = α·B + μ,  B = sign(w − μ) ∈ {−1, +1}        elsewhere (sign(0) = +1)

| symbol | meaning                                         | shape          |
|--------|-------------------------------------------------|----------------|
| W      | weights (out features × in features)            | (rows, cols)   |
| U      | upper Cholesky factor of the damped H⁻¹         | (cols, cols)   |
| σ      | saliency                                        | (rows, cols)   |
| salient| True where the weight keeps `high_bit` bits     | (rows, cols)   |
| s, z   | high-bit step and integer zero point per row    | (rows,)        |
| alpha  | binarization scale per row and group            | (rows, groups) |
| mu     | binarization mean per row and group             | (rows, groups) |
| levels | int16: high-bit level where salient, sign bit (1 = +1) elsewhere | (rows, c) |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .base import BlockContext, Method, MethodArgumentError, ScaleRounding
from .codes import PartialBinaryCodes, ScaleDtype, to_storage
from .gptq import minmax_params, quantize_uniform


@dataclass(frozen=True)
class PBLLMArgs:
    salient_fraction: float = 0.1  # = 1 − low_frac of the reference CLI
    # README/tables; CLI default magnitude
    salient_metric: Literal["magnitude", "hessian"] = "hessian"
    high_bit: int = 8
    groupsize: int = -1  # columns sharing one threshold and one (α, μ) per row; -1 = whole row
    stats: Literal["reference", "masked"] = "reference"
    hessian_diag: Literal["cholesky", "inverse"] = "cholesky"
    scale_dtype: ScaleDtype = "float16"  # storage precision of s, α, μ (float32: no rounding)
    scale_rounding: ScaleRounding = "after"  # round once after the layer, or "in_loop"


@dataclass(frozen=True)
class PBLLMState:
    """Everything PB-LLM fixes before the column loop (one per linear)."""

    salient: Tensor     # (rows, cols) bool
    high_scale: Tensor  # (rows,) step, rounded to the storage precision
    high_zero: Tensor   # (rows,) integer zero point (float tensor)
    alpha: Tensor       # (rows, groups) rounded to the storage precision
    mu: Tensor          # (rows, groups) rounded to the storage precision
    groupsize: int      # columns per group (cols for groupsize −1)


@dataclass(frozen=True)
class PBLLMGrid:
    state: PBLLMState
    start: int  # first column of the block inside the layer


def weight_saliency(W: Tensor, U: Tensor | None, metric: str, hessian_diag: str) -> Tensor:
    """σ (rows, cols): |W| or W²/d_j² with d the Cholesky (U_jj) or inverse ([H⁻¹]_jj) diagonal."""
    if metric == "magnitude":
        return W.abs()
    if U is None:
        raise MethodArgumentError("salient_metric=hessian needs calibration data (a Hessian); "
                                  "use salient_metric=magnitude to select by |W| alone")
    d = torch.diag(U) if hessian_diag == "cholesky" else (U ** 2).sum(dim=0)  # (cols,)
    return W ** 2 / d[None, :] ** 2


def salient_mask(sigma: Tensor, low_frac: float) -> Tensor:
    """True where σ (rows, c) exceeds the element of 0-based rank ⌊numel·low_frac⌋ (§2.1)."""
    flat = sigma.reshape(-1)
    k = min(int(flat.numel() * low_frac + 1e-9), flat.numel() - 1)  # 1e-9: 1 − 0.9 style noise
    tau = torch.kthvalue(flat, k + 1).values  # kthvalue is 1-based
    return sigma > tau


def binarization_stats(W: Tensor, salient: Tensor, stats: str,
                       scale_dtype: ScaleDtype = "float16") -> tuple[Tensor, Tensor]:
    """Per-row (alpha, mu) of the non-salient part of W (rows, c), rounded to `scale_dtype`.

    reference: μ = mean_j M_rj, α = mean_j |M_rj − μ| with M = W ⊙ ¬salient over all c columns.
    masked:    the same means over the non-salient entries only (0 for rows without any).
    """
    keep = (~salient).to(W.dtype)  # (rows, c)
    M = W * keep
    if stats == "reference":
        mu = M.mean(dim=1)  # (rows,)
        alpha = (M - mu[:, None]).abs().mean(dim=1)
    else:
        n = keep.sum(dim=1).clamp(min=1)  # (rows,)
        mu = M.sum(dim=1) / n
        alpha = ((W - mu[:, None]).abs() * keep).sum(dim=1) / n
    return to_storage(alpha, scale_dtype), to_storage(mu, scale_dtype)


class PBLLM(Method):
    name = "pbllm"
    Args = PBLLMArgs
    feedback = "column"
    needs_hessian = True

    def __init__(self, args: PBLLMArgs):
        if not 0.0 <= args.salient_fraction <= 1.0:
            raise MethodArgumentError(f"salient_fraction={args.salient_fraction}: use a fraction "
                                      "between 0 and 1, e.g. 0.1 for 10 % salient weights")
        if not 1 <= args.high_bit <= 8:
            raise MethodArgumentError(f"high_bit={args.high_bit}: PB-LLM keeps salient weights "
                                      "at 1 to 8 bits (8 in the paper)")
        if args.groupsize == 0 or args.groupsize < -1:
            raise MethodArgumentError(f"groupsize={args.groupsize}: use -1 (whole row) or a "
                                      "positive number of columns")
        super().__init__(args)

    def prepare(self, W: Tensor, H: Tensor | None, U: Tensor | None, *,
                original: Tensor | None = None) -> PBLLMState:
        a = self.args
        cols = W.shape[1]
        gs = cols if a.groupsize == -1 else a.groupsize
        sigma = weight_saliency(W, U, a.salient_metric, a.hessian_diag)  # (rows, cols)
        salient = torch.zeros_like(W, dtype=torch.bool)
        alphas, mus = [], []
        for g0 in range(0, cols, gs):  # a handful of groups; rows stay vectorised
            g = slice(g0, min(g0 + gs, cols))
            salient[:, g] = salient_mask(sigma[:, g], 1.0 - a.salient_fraction)  # (rows, gs)
            alpha, mu = binarization_stats(W[:, g], salient[:, g], a.stats, self.loop_dtype)
            alphas.append(alpha)
            mus.append(mu)
        # (rows,) each, over the full row, dead columns included (the reference's order)
        W0 = W if original is None else original
        scale, zero = minmax_params(W0, a.high_bit, self.loop_dtype)
        return PBLLMState(salient=salient, high_scale=scale, high_zero=zero,
                          alpha=torch.stack(alphas, 1), mu=torch.stack(mus, 1), groupsize=gs)

    def fit(self, W: Tensor, ctx: BlockContext) -> PBLLMGrid:
        return PBLLMGrid(ctx.state, ctx.columns.start)

    def _columns(self, grid: PBLLMGrid, cols: slice):
        """Salient mask, α and μ of the block-relative columns `cols`, each (rows, c)."""
        st = grid.state
        a = slice(grid.start + cols.start, grid.start + cols.stop)  # absolute columns
        g = torch.arange(a.start, a.stop, device=st.alpha.device) // st.groupsize  # (c,)
        return st.salient[:, a], st.alpha[:, g], st.mu[:, g]

    def round(self, W: Tensor, grid: PBLLMGrid, cols: slice) -> Tensor:
        st = grid.state
        salient, _, mu = self._columns(grid, cols)  # (rows, c)
        q = quantize_uniform(W, st.high_scale[:, None], st.high_zero[:, None], self.args.high_bit)
        bit = W >= mu  # B = +1 where w − μ ≥ 0
        return torch.where(salient, q.to(torch.int16), bit.to(torch.int16))  # (rows, c)

    def dequantize(self, grid: PBLLMGrid, levels: Tensor, cols: slice) -> Tensor:
        st = grid.state
        salient, alpha, mu = self._columns(grid, cols)
        # the same expressions as PartialBinaryCodes.dequantize, so both agree bit for bit
        low = alpha * ((levels == 1).to(torch.float32) * 2 - 1) + mu
        high = st.high_scale[:, None] * (levels.to(torch.float32) - st.high_zero[:, None])
        return torch.where(salient, high, low)

    def codes(self, grids: list[PBLLMGrid], levels: Tensor) -> PartialBinaryCodes:
        st = grids[0].state
        return PartialBinaryCodes(
            salient=st.salient,
            q_high=torch.where(st.salient, levels, 0).to(torch.uint8),
            high_scale=st.high_scale, high_zero=st.high_zero,
            signs=(levels == 1) & ~st.salient,
            alpha=st.alpha, mu=st.mu, high_bit=self.args.high_bit, groupsize=st.groupsize,
            scale_dtype=self.loop_dtype)
