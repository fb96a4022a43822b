"""block-sign: one sign plane with a scale per row and block of columns (llama.cpp's Q1_0 and kin).

    Ŵ[r, c] = μ[r, b] + α[r, b] · β[c] · B[r, c]      B = ±1, b = c // block
    μ only with mean=true (else 0), β only with column_scales=true (else 1)

`q1_0` is the preset block=128, no mean, no column scales: a sign bit per weight plus one fp16
α per 128 consecutive weights of a row (1.125 stored bits per weight), byte for byte the
`block_q1_0` of llama.cpp (`binllm export DIR --format gguf`). `block-sign` (mean=true by
default: 1.25 bits at block 128) and the options are the family's other points.

Fit of one block, W (rows, B) after the feedback of earlier blocks, U (B, B) its block of the
upper Cholesky factor of the damped H⁻¹:

  init     μ = mean_c W, α = mean_c |W − μ| (no mean: μ = 0, α = mean_c |W|), B = sign(W − μ);
           with a mean, `refine_iters` ARB iterations in weight space (`arb1`); with column
           scales, (α, β) from ARB-RC's `rc1` on W − μ, β then held fixed
  B-step   feedback "column" (the default): GPTQ's column pass with the grid held fixed: column j
           takes the nearer level μ ± α·β_j after the errors of columns < j were fed back into it;
           feedback "block" / "none": B = sign(W − μ) (the nearest level, no feedback)
  α-step   (μ, α) = argmin ‖(W − μ𝟙ᵀ − α B diag β) A‖² per row, closed form (2 × 2 at most),
           A = U⁻¹ for "column", A = I otherwise
  ARB      B-step and α-step alternate `refine_iters` times; every (μ, α, B) visited is scored
           by the same objective and each row keeps its best, so the result is never worse
           than the plain GPTQ pass on the initial grid (refine_iters = 0).

Why A = U⁻¹: the column loop's errors err = (W̃_j − q_j)/U_jj satisfy W − Q = err · U (U upper
triangular), so Σ err² = ‖(W − Q) U⁻¹‖² is exactly GPTQ's loss of the block with the later
columns of the layer compensating; it is the error the B-step's signs leave, and the α-step
minimizes it for those signs. The loop then replays the block with the chosen signs (`round`
returns them), so its error feedback to later blocks is exact for the stored weights.

What "ARB refinement" means without a mean: in weight space α-only binarization is at its fixed
point at once (for B = sign W, α = mean |W| is the least-squares scale, and for α > 0 the
nearest signs are sign W), so with feedback none this is exactly llama.cpp's reference
quantizer (d = Σ|x|/128, bit = x ≥ 0). With the GPTQ pass the signs of later columns depend on
α (they absorb the fed-back error of earlier ones) and mean |W| is no longer optimal for them:
the alternation is α ↔ (signs chosen by error feedback), measured in U⁻¹-space.

| symbol | meaning                                           | shape      |
|--------|---------------------------------------------------|------------|
| W      | block of weights after feedback                   | (rows, B)  |
| U      | block of the upper Cholesky factor of H⁻¹         | (B, B)     |
| mu, μ  | row mean of the block (zeros without a mean)      | (rows,)    |
| alpha  | row scale of the block                            | (rows,)    |
| beta   | column scales of the block (ones without)         | (B,)       |
| B      | signs, True = +1                                  | (rows, B)  |
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from . import arb_refine
from .base import BlockContext, Method, MethodArgumentError
from .codes import BinaryCodes, ScaleDtype, q8_round, to_storage


@dataclass(frozen=True)
class BlockSignArgs:
    """block-sign's options (the `q1_0` preset: block=128, mean=false, column_scales=false).

    block          columns sharing one (α, μ) per row; also the reconstruction block
    mean           a row mean μ per block (one more fp16 per block and row)
    column_scales  ARB-RC-style column scales β (one fp16 per column), fitted in weight space
    refine_iters   ARB alternations of (μ, α) and the signs (0: plain GPTQ on the initial grid)
    scale_dtype    storage precision of α, μ, β ("float16"; "float32": no rounding)
    scale_codes    "float": α, μ at scale_dtype; "q8": 8-bit codes with one fp16 super-scale per
                   `superblock_rows` rows of the block (`codes.q8_round`), used by every B-step
    superblock_rows  rows sharing one fp16 super-scale with scale_codes=q8 (256)
    """

    block: int = 128
    mean: bool = True
    column_scales: bool = False
    refine_iters: int = 3
    scale_dtype: ScaleDtype = "float16"
    scale_codes: Literal["float", "q8"] = "float"
    superblock_rows: int = 256


def _in_space(M: Tensor, A: Tensor | None) -> Tensor:
    """M A (rows, B) with A = U⁻¹, the error space of GPTQ's loss; M itself without A."""
    return M if A is None else M @ A


def levels(mu: Tensor, alpha: Tensor, beta: Tensor, signs: Tensor) -> Tensor:
    """Ŵ (rows, c) = μ + α·β·(±1) for mu, alpha (rows,), beta (c,), signs (rows, c) bool."""
    c = alpha[:, None] * beta[None, :]  # (rows, c)
    return mu[:, None] + torch.where(signs, c, -c)


def sign_pass(W: Tensor, U: Tensor | None, mu: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Signs (rows, B) of the grid μ ± α·β_j: GPTQ's column pass with U, else the nearest level.

    With U, column j is rounded after the errors (w̃_i − q_i)/U_ii of the columns i < j were
    fed back as w̃_j −= Σ_i err_i U_ij, exactly as `reconstruct`'s column loop does.
    """
    if U is None:
        return (W - mu[:, None]) * (alpha[:, None] * beta[None, :]) >= 0
    W = W.clone()
    signs = torch.empty(W.shape, dtype=torch.bool, device=W.device)
    for j in range(W.shape[1]):
        c = alpha * beta[j]  # (rows,)
        s = (W[:, j] - mu) * c >= 0  # (rows,) the nearer of μ ± c (ties to +)
        q = mu + torch.where(s, c, -c)
        err = (W[:, j] - q) / U[j, j]  # (rows,)
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
        signs[:, j] = s
    return signs


def fit_scales(X: Tensor, one: Tensor, V: Tensor, mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row least squares of X ≈ μ·one + α·V (all in the error space).

    X, V (rows, B); one (1, B) the image of the all-ones row. Returns (mu, alpha, ok), ok False
    where the system is degenerate (a row whose signed basis is parallel to `one`).
    """
    g11 = (V * V).sum(1)  # (rows,)
    r1 = (V * X).sum(1)
    if not mean:
        ok = g11 > 0
        return torch.zeros_like(g11), torch.where(ok, r1 / torch.where(ok, g11, 1.0), 0.0), ok
    g00 = (one * one).sum()  # scalar
    g01 = (V * one).sum(1)
    r0 = (X * one).sum(1)
    det = g00 * g11 - g01 * g01  # (rows,)
    ok = det > 1e-6 * g00 * g11
    safe = torch.where(ok, det, torch.ones_like(det))
    return (r0 * g11 - r1 * g01) / safe, (g00 * r1 - g01 * r0) / safe, ok


class BlockSign(Method):
    name = "block-sign"
    Args = BlockSignArgs
    feedback = "column"
    needs_hessian = True

    def __init__(self, args: BlockSignArgs):
        if args.block < 1:
            raise MethodArgumentError(f"block={args.block}: use at least one column per block")
        if args.refine_iters < 0:
            raise MethodArgumentError(f"refine_iters={args.refine_iters}: use 0 or more")
        if args.superblock_rows < 1:
            raise MethodArgumentError(f"superblock_rows={args.superblock_rows}: use at least 1")
        super().__init__(args)

    def block_size(self, default: int, cols: int) -> int:
        return self.args.block

    # -- fit ------------------------------------------------------------------------------
    def _init(self, W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mu, alpha, beta) from the weights alone, rounded to storage."""
        a, rows, B = self.args, *W.shape
        every = torch.ones_like(W, dtype=torch.bool)
        mu = torch.zeros(rows, device=W.device)
        if a.mean:
            alpha, mu, _ = arb_refine.arb1(W, every, a.refine_iters)
        else:
            alpha = W.abs().mean(1)
        beta = torch.ones(B, device=W.device)
        if a.column_scales:
            alpha, beta, _ = arb_refine.rc1(W - mu[:, None], every, a.refine_iters)
        return self._store(mu), self._store(alpha), to_storage(beta, a.scale_dtype)

    @property
    def q8_rows(self) -> int:
        return self.args.superblock_rows if self.args.scale_codes == "q8" else 0

    def _store(self, x: Tensor) -> Tensor:
        """A row vector (rows,) of α or μ at its storage precision (8-bit codes with q8)."""
        if self.q8_rows:
            return q8_round(x[:, None], self.q8_rows)[:, 0]
        return to_storage(x, self.args.scale_dtype)

    def fit(self, W: Tensor, ctx: BlockContext) -> BinaryCodes:
        a, (rows, B) = self.args, W.shape
        U = ctx.U if ctx.feedback == "column" else None
        if ctx.feedback == "column" and U is None:
            raise MethodArgumentError("column feedback needs the layer's Hessian; calibrate or "
                                      "use feedback='none'")
        mu, alpha, beta = self._init(W)
        A = None if U is None else torch.linalg.solve_triangular(  # U⁻¹, upper triangular
            U, torch.eye(B, device=W.device, dtype=U.dtype), upper=True)
        X = _in_space(W, A)  # (rows, B)
        one = _in_space(torch.ones(1, B, device=W.device), A)  # (1, B)
        best = None

        def consider(mu, alpha, signs):
            nonlocal best
            loss = ((X - _in_space(levels(mu, alpha, beta, signs), A)) ** 2).sum(1)  # (rows,)
            if best is None:
                best = [loss, mu, alpha, signs]
                return
            take = loss < best[0]  # (rows,)
            best = [torch.where(take, loss, best[0]), torch.where(take, mu, best[1]),
                    torch.where(take, alpha, best[2]), torch.where(take[:, None], signs, best[3])]

        for it in range(a.refine_iters + 1):
            signs = sign_pass(W, U, mu, alpha, beta)  # B-step
            consider(mu, alpha, signs)
            if it == a.refine_iters:
                break
            V = _in_space(torch.where(signs, beta, -beta), A)  # (rows, B): B diag β in A-space
            new_mu, new_alpha, ok = fit_scales(X, one, V, a.mean)  # α-step
            flip = new_alpha < 0  # α ≥ 0 by convention: −α·B = α·(−B)
            signs = signs ^ flip[:, None]
            mu = self._store(torch.where(ok, new_mu, mu))
            alpha = self._store(torch.where(ok, new_alpha.abs(), alpha))
            consider(mu, alpha, signs)
        _, mu, alpha, signs = best
        if self.q8_rows:  # rows kept from different steps: one super-scale per block again
            mu, alpha = self._store(mu), self._store(alpha)
        return BinaryCodes(
            group=torch.zeros(rows, B, dtype=torch.uint8, device=W.device), signs=signs[None],
            alpha=alpha[None, None, :, None], mu=mu[None, :, None] if a.mean else None,
            beta=beta[None, None, :] if a.column_scales else None,
            salient_cols=torch.zeros(B, dtype=torch.bool, device=W.device), orders=(1,),
            n_salient=0, block_size=a.block, scale_dtype=a.scale_dtype, q8_rows=self.q8_rows)

    # -- the loop replays the fitted signs ----------------------------------------------------
    def round(self, W: Tensor, grid: BinaryCodes, cols: slice) -> Tensor:
        return grid.signs[:, :, cols]  # (1, rows, c)

    def dequantize(self, grid: BinaryCodes, levels_: Tensor, cols: slice) -> Tensor:
        rows = levels_.shape[1]
        mu = grid.mu[0, :, 0] if grid.mu is not None else torch.zeros(rows, device=levels_.device)
        beta = grid.beta[0, 0, cols] if grid.beta is not None else \
            torch.ones(levels_.shape[2], device=levels_.device)
        return levels(mu, grid.alpha[0, 0, :, 0], beta, levels_[0])  # (rows, c)

    def codes(self, grids: list[BinaryCodes], levels_: Tensor) -> BinaryCodes:
        return replace(BinaryCodes.cat(grids), signs=levels_)
