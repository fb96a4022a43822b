"""binary-factor: a linear's weight as two sign matrices with scales, below one bit per weight.

    Ŵ = diag(s_out) · sign(U) · sign(V)ᵀ · diag(s_in),   U (rows, r), V (cols, r)

NanoQuant's representation (ICML 2026): nothing is stored per weight, so the stored bits per
weight are set by the rank r alone (`FactorCodes`, `binllm.methods.factor_codes`).

**Rank from the bit budget.** `bits` is the stored bits per weight of each linear, every stored
tensor counted: r is the largest rank with

    8·⌈rows·r / 8⌉ + 8·⌈cols·r / 8⌉ + 16·(rows + cols)  ≤  bits · rows · cols

(both sign planes as byte-padded bit streams, the fp16 scales s_out, s_in), at least 1 (a
layer too small for its budget gets r = 1 and stores more than `bits`). Without the padding,
r = ⌊bits · rows · cols / (rows + cols)⌋ − 16: a 4096 × 4096 linear at bits=1 gets r = 2032.

**Initialisation** of one linear W (rows, cols) with the Gram matrix H of its inputs:

1. importance d = √diag H of the input channels (NanoQuant's input norms), W̃ = W · diag(d);
2. real factors A (rows, r), B (cols, r) from the truncated SVD of W̃ (√σ on both sides;
   columns beyond min(rows, cols) start small and random);
3. ADMM on ‖W̃ − A Bᵀ‖² with A = Z_A, B = Z_B, the Z constrained to sign × magnitude
   (Z = diag(m) · sign(Z): each row's magnitude m = mean |row|, the exact projection):
       A   = (W̃ B + ρ (Z_A − Λ_A)) (BᵀB + ρ I)⁻¹       B likewise with W̃ᵀ and A
       Z   = proj(factor + Λ),  Λ += factor − Z,      ρ grows by `rho_growth` per iteration
   `admm_iters` times; sign(U) = sign(Z_A), sign(V) = sign(Z_B). The defaults (80
   iterations, ρ from 0.02 growing by 1.08) were chosen on SmolLM2-135M's layer-10 q_proj and
   down_proj at bits=1: relative ‖W − Ŵ‖² 0.33 and 0.42, against 0.37 and 0.46 with 40
   iterations (0.05, ×1.15) and 0.30 for q_proj with 200 (0.01, ×1.04), at 2.5× the time;
4. `sign_sweeps` passes of coordinate descent on the signs, U's then V's, against W̃ with
   ADMM's magnitudes: a sign flips where that lowers the error, so no pass raises it (on
   SmolLM2's layer-10 q_proj at bits=1, relative error 0.327 after ADMM, 0.313 after two);
5. s_out, s_in by least squares on the layer's proxy loss tr((W − Ŵ) H (W − Ŵ)ᵀ) (H damped by
   1 % of its mean diagonal): each is a closed form given the other (s_out per row; s_in one
   cols × cols system), alternated `scale_iters` times from ADMM's magnitudes; every step
   is an exact minimiser, so the loss never rises.

It is a whole-matrix method: one block of all columns, by default without error feedback
(NanoQuant's initialisation). With `--feedback column` the loop then rebuilds the right factor
column by column with GPTQ's error feedback (a named option beyond NanoQuant): the left factor
A = diag(s_out)·S_U stays as above, and each input column j, its weights w_j already carrying
the errors of the columns before, gets the signs v_j ∈ {±1}^r and scale s_in_j of

    min ‖w_j − s_in_j · A v_j‖²        v_j from sign(A⁺ w_j), then rounds of single sign
                                       flips, each the one that lowers the error most (s_in_j
                                       held, the error's projection Aᵀr updated in O(r) a flip
                                       through AᵀA), s_in_j refitted by least squares after
                                       each round, until a round flips nothing or `flips`
                                       flips are spent,

and its error is pushed onto the columns after it (`binllm.engine.reconstruct`). On
SmolLM2-135M's layer 10 at bits=1 this lowers the proxy loss tr(EHEᵀ)/tr(WHWᵀ) of q_proj,
o_proj and down_proj from 0.048 / 0.290 / 0.243 to 0.042 / 0.253 / 0.204 (q1_0: 0.065 / 0.206
/ 0.206), for about 1 s (576 columns) to 5 s (1,536) more per linear on one core.

`--refine block` then trains s_out, s_in and latent weights behind sign(U), sign(V) through
the straight-through sign (`binllm.methods.trainable`), which is NanoQuant's block-wise
stage; without it the codes are the initialisation alone, and the run's report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .base import BlockContext, Method, MethodArgumentError
from .codes import ScaleDtype, to_storage
from .factor_codes import FactorCodes, factor_bits, factor_product

BITS_RANGE = (0.55, 2.0)  # stored bits per weight binary-factor accepts


@dataclass(frozen=True)
class BinaryFactorArgs:
    """binary-factor's options.

    bits         stored bits per weight of each linear (0.55 to 2.0); sets the rank r
    admm_iters   ADMM iterations of the initialisation
    rho          ADMM penalty at the first iteration, relative to the mean singular value
    rho_growth   factor ρ grows by per iteration (the constraint tightens)
    sign_sweeps  passes of coordinate descent on the signs after ADMM (each flip lowers the
                 importance-scaled error)
    scale_iters  alternations of the least-squares s_out, s_in
    scale_dtype  storage precision of s_out, s_in ("float16"; "float32": no rounding)
    flips        most single sign flips per column when --feedback column refits the right
                 factor (`fit_column`)
    seed         seed of the random factor columns beyond min(rows, cols)
    """

    bits: float = 1.0
    admm_iters: int = 80
    rho: float = 0.02
    rho_growth: float = 1.08
    sign_sweeps: int = 2
    scale_iters: int = 4
    scale_dtype: ScaleDtype = "float16"
    flips: int = 128
    seed: int = 0


def rank_for_bits(rows: int, cols: int, bits: float, scale_dtype: ScaleDtype = "float16") -> int:
    """The largest r ≥ 1 whose FactorCodes store at most bits · rows · cols bits."""
    budget = bits * rows * cols
    r = max(1, int(budget // (rows + cols)))
    while r > 1 and factor_bits(rows, cols, r, scale_dtype) > budget:
        r -= 1
    return r


def importance(H: Tensor | None, cols: int, device) -> Tensor:
    """d = √diag H (cols,), dead channels (H_jj = 0) at 1e-6 of the largest; ones without H."""
    if H is None:
        return torch.ones(cols, device=device)
    d = torch.diagonal(H).to(torch.float32).clamp_min(0).sqrt()
    return d.clamp_min(1e-6 * float(d.max().clamp_min(1e-30)))


def sign_magnitude(X: Tensor) -> Tensor:
    """The nearest diag(m) · sign(X) to X (rows, r): m = mean |row|, sign(0) = +1."""
    m = X.abs().mean(1, keepdim=True)  # (rows, 1)
    return torch.where(X >= 0, m, -m)


def svd_factors(Wt: Tensor, r: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A (rows, r), B (cols, r) with A Bᵀ the best rank-min(r, rows, cols) approximation of Wt,
    √σ on both sides; further columns small (1 % of the mean entry) and random."""
    Us, S, Vh = torch.linalg.svd(Wt, full_matrices=False)
    k = min(r, S.shape[0])
    root = S[:k].sqrt()
    A, B = Us[:, :k] * root, Vh[:k].T * root
    if k < r:
        scale = 0.01 * float(A.abs().mean() + B.abs().mean()) / 2
        extra = [scale * torch.randn(n, r - k, generator=gen).to(Wt.device) for n in Wt.shape]
        A, B = torch.cat([A, extra[0]], 1), torch.cat([B, extra[1]], 1)
    return A, B


def _ridge(R: Tensor, G: Tensor) -> Tensor:
    """R G⁻¹ (n, r) for G (r, r) symmetric positive definite (a Cholesky solve)."""
    return torch.cholesky_solve(R.T, torch.linalg.cholesky(G)).T


def admm_signs(Wt: Tensor, r: int, iters: int, rho: float, growth: float,
               gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sign(U) (rows, r) bool, sign(V) (cols, r) bool, m_A (rows,), m_B (cols,)) with
    Wt ≈ diag(m_A) S_U S_Vᵀ diag(m_B): ADMM with sign × magnitude factors (module docstring)."""
    A, B = svd_factors(Wt, r, gen)
    rho = rho * max(float((A * A).sum(0).mean()), 1e-20)  # relative to the mean σ (W = 0: tiny)
    eye = torch.eye(r, dtype=Wt.dtype, device=Wt.device)
    ZA, ZB = sign_magnitude(A), sign_magnitude(B)
    LA, LB = torch.zeros_like(A), torch.zeros_like(B)
    for _ in range(iters):
        A = _ridge(Wt @ B + rho * (ZA - LA), B.T @ B + rho * eye)
        B = _ridge(Wt.T @ A + rho * (ZB - LB), A.T @ A + rho * eye)
        ZA, ZB = sign_magnitude(A + LA), sign_magnitude(B + LB)
        LA += A - ZA
        LB += B - ZB
        rho *= growth
    return ZA >= 0, ZB >= 0, ZA.abs().mean(1), ZB.abs().mean(1)


def sign_sweep(Wt: Tensor, S: Tensor, S_other: Tensor, m: Tensor, m_other: Tensor) -> Tensor:
    """One pass of coordinate descent on the signs S (n, r) of Wt (n, k) ≈ diag(m) S Bᵀ,
    B = diag(m_other) S_other (k, r): column j of S flips in every row where that lowers
    ‖Wt − diag(m) S Bᵀ‖² (the other columns as they are now). Returns S (updated in place);
    the loss never rises."""
    B = S_other * m_other[:, None]  # (k, r)
    R = Wt - m[:, None] * (S @ B.T)  # (n, k) residual
    norms = (B * B).sum(0)  # (r,)
    for j in range(S.shape[1]):
        c = -2 * S[:, j] * m  # (n,) the change of m_i S_ij if it flips
        gain = -2 * c * (R @ B[:, j]) + c * c * norms[j]  # (n,) Δ‖R_i‖² of the flip
        flip = gain < 0
        if flip.any():
            R[flip] -= c[flip, None] * B[:, j][None, :]
            S[flip, j] = -S[flip, j]
    return S


def fit_scales(W: Tensor, P: Tensor, H: Tensor, s_in: Tensor, iters: int
               ) -> tuple[Tensor, Tensor]:
    """Least-squares (s_out (rows,), s_in (cols,)) of min tr((W − diag(s_out) P diag(s_in)) H
    (…)ᵀ) for P (rows, cols) = S_U S_Vᵀ, alternating closed forms from s_in; H damped, (cols,
    cols). Every step minimises exactly, so the loss never rises."""
    W, P, H = W.double(), P.double(), H.double()
    s_in = s_in.double()
    s_out = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    for _ in range(iters):
        Pt = P * s_in[None, :]  # (rows, cols) P diag(s_in)
        PH = Pt @ H
        num, den = (PH * W).sum(1), (PH * Pt).sum(1)  # per row: w H p̃ᵀ, p̃ H p̃ᵀ
        s_out = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
        Ps = P * s_out[:, None]  # (rows, cols) diag(s_out) P
        M = H * (Ps.T @ Ps)  # (cols, cols): Σ_i s_out_i² diag(p_i) H diag(p_i)
        b = (Ps * (W @ H)).sum(0)  # (cols,): Σ_i s_out_i p_i ⊙ (H w_iᵀ)
        M.diagonal().add_(1e-12 * float(M.diagonal().mean().clamp_min(1e-300)))
        s_in = torch.linalg.solve(M, b)
    return s_out.float(), s_in.float()


@dataclass(frozen=True)
class FactorGrid:
    """fit()'s grid: the initial codes and their left signs S_U (rows, r) as ±1 floats; for
    the column loop also A = diag(s_out)·S_U (rows, r), A⁺ (r, rows) and AᵀA (r, r), which
    every column's refit of the right factor reuses (None without column feedback)."""

    codes: FactorCodes
    SU: Tensor
    A: Tensor | None = None
    A_pinv: Tensor | None = None
    gram: Tensor | None = None


def fit_column(w: Tensor, grid: FactorGrid, flips: int) -> tuple[Tensor, float]:
    """(v (r,) ±1, s ≥ 0) for one column w (rows,), lowering ‖w − s·A v‖²: v from sign(A⁺ w)
    with its least-squares s, then rounds of greedy single flips with s held (each the largest
    decrease; p = Aᵀ(w − s A v) updated through AᵀA), s refitted by least squares after each
    round, until a round flips nothing (then no single flip lowers the error at the returned
    s) or `flips` flips are spent. Every flip and every refit lowers the error."""
    A, G = grid.A, grid.gram
    c = A.T @ w  # (r,)
    v = torch.where(grid.A_pinv @ w >= 0, 1.0, -1.0)  # (r,)
    dG = torch.diagonal(G)

    def scale(v: Tensor) -> float:  # the least-squares s of signs v
        return float(v @ c) / max(float(v @ (G @ v)), 1e-30)

    s = scale(v)
    if s < 0:
        v, s = -v, -s
    left = flips
    while True:
        p = c - s * (G @ v)  # Aᵀ r, r = w − s A v
        flipped = 0
        while left > 0:
            gain = s * v * p + s * s * dG  # (r,) a quarter of Δ‖r‖² if sign k alone flips
            k = int(torch.argmin(gain))
            if float(gain[k]) >= 0:
                break
            p += (2 * s * float(v[k])) * G[:, k]
            v[k] = -v[k]
            left -= 1
            flipped += 1
        s = scale(v)
        if not flipped or not left:
            return v, s


class BinaryFactor(Method):
    name = "binary-factor"
    Args = BinaryFactorArgs
    feedback = "none"
    feedbacks = ("none", "column")
    needs_hessian = True
    needs_gram = True  # a heavy solve per linear (SVD, ADMM, a cols × cols system)
    unrefined_note = ("binary-factor ran without refinement: its codes are the ADMM "
                      "initialisation alone; block-wise refinement (--refine block, "
                      "QuantizeConfig(refine=RefineConfig())) trains them")

    def __init__(self, args: BinaryFactorArgs):
        lo, hi = BITS_RANGE
        if not lo <= args.bits <= hi:
            raise MethodArgumentError(f"bits={args.bits}: binary-factor stores {lo} to {hi} "
                                      "bits per weight; choose one in that range, e.g. bits=0.8")
        for name in ("admm_iters", "sign_sweeps", "scale_iters", "flips"):
            if getattr(args, name) < 0:
                raise MethodArgumentError(f"{name}={getattr(args, name)}: use 0 or more")
        if not args.rho > 0 or not args.rho_growth >= 1:
            raise MethodArgumentError(f"rho={args.rho}, rho_growth={args.rho_growth}: use "
                                      "rho > 0 and rho_growth ≥ 1")
        super().__init__(args)

    def block_size(self, default: int, cols: int) -> int:
        return cols  # the whole matrix at once

    def fit(self, W: Tensor, ctx: BlockContext) -> FactorGrid:
        a = self.args
        rows, cols = W.shape
        r = rank_for_bits(rows, cols, a.bits, a.scale_dtype)
        gen = torch.Generator().manual_seed(a.seed)
        W = W.to(torch.float32)
        d = importance(ctx.H, cols, W.device)  # (cols,)
        Wt = W * d[None, :]  # (rows, cols) importance-scaled
        u, v, m_out, m_in = admm_signs(Wt, r, a.admm_iters, a.rho, a.rho_growth, gen)
        SU, SV = u.float() * 2 - 1, v.float() * 2 - 1  # (rows, r), (cols, r) ±1
        for _ in range(a.sign_sweeps):
            SU = sign_sweep(Wt, SU, SV, m_out, m_in)
            SV = sign_sweep(Wt.T, SV, SU, m_in, m_out)
        u, v = SU > 0, SV > 0
        s_out, s_in = m_out, m_in / d
        if ctx.H is not None and a.scale_iters:
            H = ctx.H.to(torch.float32).clone()
            H.diagonal().add_(0.01 * float(H.diagonal().mean().clamp_min(1e-12)))
            P = SU @ SV.T  # (rows, cols), integers
            s_out, s_in = fit_scales(W, P, H, s_in, a.scale_iters)
        codes = FactorCodes(u=u, v=v, s_out=to_storage(s_out, self.loop_dtype),
                            s_in=to_storage(s_in, self.loop_dtype), scale_dtype=self.loop_dtype)
        if ctx.feedback != "column":
            return FactorGrid(codes, SU)
        A = codes.s_out[:, None] * SU  # (rows, r)
        return FactorGrid(codes, SU, A, torch.linalg.pinv(A), A.T @ A)

    def round(self, W: Tensor, grid: FactorGrid, cols: slice) -> Tensor:
        """levels (r + 1, c): the right factor's signs (±1) of these columns over their s_in;
        refitted to W's (fed-back) columns in the column loop, else the initial codes'."""
        c = grid.codes
        if grid.A is None:
            return torch.cat([c.v.T[:, cols].to(torch.float32) * 2 - 1, c.s_in[None, cols]])
        out = torch.empty(c.rank + 1, W.shape[1], device=W.device)
        for j in range(W.shape[1]):
            v, s = fit_column(W[:, j], grid, self.args.flips)
            out[:-1, j] = v
            out[-1, j] = s
        return to_storage(out, self.loop_dtype)  # the signs are exact in any dtype

    def dequantize(self, grid: FactorGrid, levels: Tensor, cols: slice) -> Tensor:
        """(rows, c): FactorCodes.dequantize's product for these columns, bit for bit."""
        return factor_product(grid.codes.s_out, grid.SU, levels[:-1].T, levels[-1])

    def codes(self, grids: list[FactorGrid], levels: Tensor) -> FactorCodes:
        (grid,) = grids  # one block: the whole matrix
        return replace(grid.codes, v=(levels[:-1] > 0).T.contiguous(), s_in=levels[-1].clone())
