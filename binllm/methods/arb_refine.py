"""ARB-LLM's alternating refined binarization kernels (ARB-LLM, Li et al. 2025), pure tensor code.

Every function binarizes the masked entries of each row of a block W (rows, c) and returns
fp32 parameters (not yet rounded to storage precision; the caller rounds them). Statistics of
a row are taken over its masked entries only; a row without masked entries gets zero scales
and means. All rows are processed at once: the only Python loops run over iterations and over
the (at most three) coefficients of one row.

Symbols (the shape letter c is the block width, the paper's B is the ±1 sign matrix):

| name        | meaning                                                   | shape          |
|-------------|-----------------------------------------------------------|----------------|
| W           | weights of the block                                      | (rows, c)      |
| mask, m     | entries of the group being binarized (m = mask as 0/1)    | (rows, c) bool |
| w           | W with unmasked entries zeroed (they never enter the math)| (rows, c)      |
| n           | masked entries per row                                    | (rows,)        |
| mu, μ       | row mean                                                  | (rows,)        |
| alpha, α    | row scale (order 2: α₁, α₂ stacked)                       | (rows,) / (2, rows) |
| B           | sign matrix, ±1 floats inside, bool outside (True = +1)   | (rows, c)      |
| S           | Gram matrix of the block's calibration inputs (= H_blk/2) | (c, c)         |
| a_r, a_c    | ARB-RC row and column scales (order 2: stacked)           | (rows,), (c,)  |

Conventions shared by all kernels: sign(0) = +1 (every weight gets one bit); returned `signs`
hold True at unmasked positions; Ŵ is only defined on the mask:
ARB:    Ŵ = (μ + Σ_o α_o B_o) ⊙ m
ARB-RC: Ŵ = (Σ_o diag(a_r^o) B_o diag(a_c^o)) ⊙ m
"""

from __future__ import annotations

import torch
from torch import Tensor

# Gram-weighted denominators below this fraction of their magnitude bound are treated as
# zero (the coefficient is left unchanged instead of dividing by round-off), see `_x_refine`.
_REL_DEGENERATE = 1e-6
# The reference adds this to the ARB-RC least-squares denominators (its `arb_rc` code).
_RC_EPS = 1e-8


# -- helpers -------------------------------------------------------------------------------
def _check(W: Tensor, mask: Tensor, iters: int, name: str = "iters") -> tuple[Tensor, Tensor]:
    """Validate the inputs; return (w, m): masked fp32 weights and the 0/1 mask, (rows, c)."""
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D (rows, columns) block, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got dtype {W.dtype}")
    if mask.shape != W.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal W shape {tuple(W.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}; pass mask.bool()")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ValueError(f"{name}={iters!r}: the iteration count must be an int >= 0")
    w = torch.where(mask, W.to(torch.float32), 0.0)  # (rows, c); NaN/inf outside are dropped
    return w, mask.to(torch.float32)


def _check_S(S: Tensor, W: Tensor) -> Tensor:
    c = W.shape[1]
    if S.shape != (c, c):
        raise ValueError(f"S must be the ({c}, {c}) Gram matrix of the block's columns, "
                         f"got shape {tuple(S.shape)}")
    S = S.to(device=W.device, dtype=torch.float32)
    return (S + S.T) / 2  # the quadratic forms only see the symmetric part


def _pm(signs: Tensor) -> Tensor:
    """bool (True = +1) -> ±1 floats."""
    return signs.to(torch.float32) * 2 - 1


def _mean_m(X: Tensor, m: Tensor, n: Tensor) -> Tensor:
    """Row mean of X over the masked entries; 0 for rows without any. (rows,)"""
    return (X * m).sum(dim=1) / n.clamp(min=1)


def _bra_order1(x: Tensor, m: Tensor, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """BiLLM's first-order binarization of masked x (§3.1): μ, α, B (±1, sign(0) = +1)."""
    mu = _mean_m(x, m, n)  # (rows,)
    alpha = _mean_m((x - mu[:, None]).abs(), m, n)  # (rows,)
    B = _pm(x >= mu[:, None])  # (rows, c)
    return alpha, mu, B


def _nearest4(x: Tensor, c1: Tensor, c2: Tensor) -> tuple[Tensor, Tensor]:
    """Joint sign update: per entry the (B₁, B₂) ∈ {±1}² whose level B₁c₁ + B₂c₂ is nearest x.

    Candidates in the reference's order (−−, −+, +−, ++); ties go to the first. c1, c2
    broadcast against x (rows, c). Returns ±1 floats (B₁, B₂), each (rows, c).
    """
    c1, c2 = torch.broadcast_tensors(c1, c2)
    levels = torch.stack([-c1 - c2, -c1 + c2, c1 - c2, c1 + c2], dim=-1)  # (rows, c|1, 4)
    idx = (x[..., None] - levels).abs().argmin(dim=-1)  # (rows, c)
    return _pm(idx >= 2), _pm(idx % 2 == 1)


def _out_signs(B: Tensor, mask: Tensor) -> Tensor:
    """±1 floats -> bool signs, True at unmasked positions."""
    return (B > 0) | ~mask


# -- §4.1 / §4.2: ARB in weight space ------------------------------------------------------
def arb1(W: Tensor, mask: Tensor, iters: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """First-order ARB (§4.1, ARB-LLM Alg. 1; reference `high_order_residual_alternating_order1`).

    Minimizes ‖(W − αB − μ) ⊙ m‖² per row. Init = BiLLM order 1: μ = mean_m w,
    α = mean_m |w − μ|, B = sign(w − μ). Each of `iters` iterations, in the paper's and the
    reference's order μ → α → B:
      μ ← mean_m(w − αB)                      (reference: μ + mean_m(w − Ŵ), the same value)
      α ← Σ_m B(w − μ) / Σ_m B²               (= Σ_m B(w − μ) / n since B = ±1)
      B ← sign(w − μ)
    The final α is therefore the least-squares scale of the previous B, as in the reference.
    Differences from the reference: sign(0) = +1 instead of 0 (so Σ_m B² = n exactly and the
    reference's +1e-8 is unnecessary).

    Returns alpha (rows,), mu (rows,), signs (rows, c) bool (True = +1).
    """
    w, m = _check(W, mask, iters)
    n = m.sum(dim=1)  # (rows,)
    alpha, mu, B = _bra_order1(w, m, n)
    for _ in range(iters):
        mu = _mean_m(w - alpha[:, None] * B, m, n)  # (rows,)
        alpha = _mean_m(B * (w - mu[:, None]), m, n)  # (rows,)
        B = _pm(w >= mu[:, None])  # (rows, c)
    return alpha, mu, _out_signs(B, mask)


def _arb2_init(w: Tensor, m: Tensor, n: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BiLLM order-2 residual init (§3.1): (α₁, B₁, μ₁) on w, (α₂, B₂, μ₂) on the residual."""
    a1, mu1, B1 = _bra_order1(w, m, n)
    rho = (w - a1[:, None] * B1 - mu1[:, None]) * m  # (rows, c)
    a2, mu2, B2 = _bra_order1(rho, m, n)
    return a1, a2, mu1 + mu2, B1, B2


def arb2(W: Tensor, mask: Tensor, iters: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Second-order ARB with one mean (§4.2; reference `high_order_residual_alternating_mean`).

    Ŵ = (α₁B₁ + α₂B₂ + μ) ⊙ m. Init = BiLLM's order-2 residual binarization, μ = μ₁ + μ₂.
    Each iteration: μ ← mean_m(w − α₁B₁ − α₂B₂); α₁ ← ⟨B₁, w − μ − α₂B₂⟩_m / n (α₂ old);
    α₂ ← ⟨B₂, w − μ − α₁B₁⟩_m / n (α₁ new); then (B₁, B₂) jointly: per entry the nearest of
    the four levels ±α₁ ± α₂ to w − μ (ties to the first of −−, −+, +−, ++ as in the
    reference's argmin). Every step is an exact coordinate minimization, so the error never
    increases. Differences from the reference: sign(0) = +1 in the init (reference: 0).

    Returns alpha (2, rows), mu (rows,), signs (2, rows, c) bool.
    """
    w, m = _check(W, mask, iters)
    n = m.sum(dim=1)  # (rows,)
    a1, a2, mu, B1, B2 = _arb2_init(w, m, n)
    for _ in range(iters):
        mu = _mean_m(w - a1[:, None] * B1 - a2[:, None] * B2, m, n)  # (rows,)
        r = w - mu[:, None]  # (rows, c)
        a1 = _mean_m(B1 * (r - a2[:, None] * B2), m, n)  # (rows,)
        a2 = _mean_m(B2 * (r - a1[:, None] * B1), m, n)  # (rows,)
        B1, B2 = _nearest4(r, a1[:, None], a2[:, None])  # (rows, c) each
    return torch.stack([a1, a2]), mu, torch.stack([_out_signs(B1, mask), _out_signs(B2, mask)])


# -- §4.3: ARB-X (X-space refinement, signs fixed) -----------------------------------------
def _x_refine(w: Tensor, m: Tensor, S: Tensor, planes: list[Tensor], coef: list[Tensor],
              iters: int) -> list[Tensor]:
    """Coordinate descent on ‖(w − ŵ) ⊙ m‖²_S = e S eᵀ, ŵ = coef₀·𝟙 + Σ_k coef_k·B_k, B fixed.

    With masked basis vectors v₀ = m, v_k = B_k ⊙ m (k ≥ 1) the per-row Gram G_kj = v_k S v_jᵀ
    and right-hand side b_k = v_k S wᵀ are computed once (signs never change), after which
    each update is the exact minimizer over one coefficient, in the order μ, α₁(, α₂):
      coef_k ← (b_k − Σ_{j≠k} G_kj coef_j) / G_kk.
    For k = 0 this is μ = 𝟙ᵀS(w − ΣαB)/𝟙ᵀS𝟙, for k ≥ 1 α_k = B_kᵀS(w − μ − Σ_{j≠k}α_jB_j)/B_kᵀSB_k
    (all restricted to the masked columns), i.e. the reference's formulas. Where G_kk is below
    1e-6 · v_k|S|v_kᵀ (S gives that direction no weight: empty row, dead inputs) the
    coefficient keeps its weight-space value; the reference divides by G_kk + 1e-10 instead,
    which yields 0 or round-off noise there.
    """
    V = torch.stack([m] + [B * m for B in planes])  # (K+1, rows, c)
    VS = torch.einsum("krc,cd->krd", V, S)  # (K+1, rows, c)
    G = torch.einsum("krd,jrd->rkj", VS, V)  # (rows, K+1, K+1)
    b = torch.einsum("krd,rd->rk", VS, w)  # (rows, K+1)
    bound = torch.einsum("rc,cd,rd->r", m, S.abs(), m)  # (rows,) |v_k| = m for every k
    diag = torch.diagonal(G, dim1=1, dim2=2)  # (rows, K+1)
    ok = diag > _REL_DEGENERATE * bound[:, None]  # (rows, K+1)
    safe = torch.where(ok, diag, torch.ones_like(diag))  # (rows, K+1)
    c = list(coef)  # K+1 tensors (rows,)
    for _ in range(iters):
        for k in range(len(c)):
            rest = sum(G[:, k, j] * c[j] for j in range(len(c)) if j != k)  # (rows,)
            c[k] = torch.where(ok[:, k], (b[:, k] - rest) / safe[:, k], c[k])  # (rows,)
    return c


def arb_x1(W: Tensor, mask: Tensor, S: Tensor, iters: int = 15,
           arb_iters: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """First-order ARB-X (§4.3; reference `high_order_residual_alternating_order1_x`).

    Runs `arb1(W, mask, arb_iters)` (weight space, signs updated), then `iters` iterations
    with the signs fixed minimizing the calibration-weighted error per row
    ‖(w − ŵ) ⊙ m‖²_S = (e ⊙ m) S (e ⊙ m)ᵀ, e = w − αB − μ, S (c, c) the Gram matrix of the
    block's inputs (the caller passes H_blk/2): μ = 𝟙ᵀS(w − αB)/𝟙ᵀS𝟙, then
    α = BᵀS(w − μ)/BᵀSB (masked columns only). The paper's Fig. 4 draws only the X-space
    alternation from the BiLLM init; the reference (and this function) first runs the weight-
    space ARB iterations. See `_x_refine` for the degenerate-denominator rule.

    Returns alpha (rows,), mu (rows,), signs (rows, c) bool.
    """
    w, m = _check(W, mask, iters)
    _check(W, mask, arb_iters, "arb_iters")
    S = _check_S(S, W)
    alpha, mu, signs = arb1(W, mask, arb_iters)
    mu, alpha = _x_refine(w, m, S, [_pm(signs)], [mu, alpha], iters)
    return alpha, mu, signs


def arb_x2(W: Tensor, mask: Tensor, S: Tensor, iters: int = 15,
           arb_iters: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Second-order ARB-X (§4.3; reference `high_order_residual_alternating_mean_x`).

    Runs `arb2(W, mask, arb_iters)`, then `iters` S-weighted iterations with (B₁, B₂) fixed:
    μ = 𝟙ᵀS(w − α₁B₁ − α₂B₂)/𝟙ᵀS𝟙, α₁ = B₁ᵀS(w − μ − α₂B₂)/B₁ᵀSB₁ (α₂ old), then
    α₂ = B₂ᵀS(w − μ − α₁B₁)/B₂ᵀSB₂ (α₁ new), masked columns only. Same ordering remark as
    `arb_x1` (weight-space iterations first, as in the reference, unlike the paper's figure).

    Returns alpha (2, rows), mu (rows,), signs (2, rows, c) bool.
    """
    w, m = _check(W, mask, iters)
    _check(W, mask, arb_iters, "arb_iters")
    S = _check_S(S, W)
    alpha, mu, signs = arb2(W, mask, arb_iters)
    mu, a1, a2 = _x_refine(w, m, S, [_pm(signs[0]), _pm(signs[1])], [mu, alpha[0], alpha[1]],
                           iters)
    return torch.stack([a1, a2]), mu, signs


# -- §4.4: ARB-RC (row and column scales, no mean) -----------------------------------------
def _rc_init(x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One RC term from x (masked): a_r = mean_row |x|, a_c = mean_col |x / a_r|, B = sign x.

    Entries of rows with a_r = 0 are skipped in the column mean (the reference's x / 0 gives
    NaN there, which its nanmean skips). Returns a_r (rows,), a_c (c,), B (rows, c) ±1.
    """
    x_abs = x.abs() * m  # (rows, c)
    a_r = x_abs.sum(dim=1) / m.sum(dim=1).clamp(min=1)  # (rows,)
    live = m * (a_r > 0)[:, None]  # (rows, c)
    ratio = torch.where(live > 0, x_abs / torch.where(a_r > 0, a_r, 1.0)[:, None], 0.0)
    a_c = ratio.sum(dim=0) / live.sum(dim=0).clamp(min=1)  # (c,)
    return a_r, a_c, _pm(x >= 0)


def _rc_als(target: Tensor, m: Tensor, B: Tensor, a_c: Tensor) -> tuple[Tensor, Tensor]:
    """One alternating step for the term diag(a_r) B diag(a_c) against `target` (masked).

    a_r ← Σ_j a_c B t / (Σ_j (a_c B)² + ε), then a_c ← Σ_i a_r B t / (Σ_i (a_r B)² + ε), masked
    sums, ε = 1e-8 as in the reference. Returns the new (a_r (rows,), a_c (c,)).
    """
    cB = a_c[None, :] * B * m  # (rows, c)
    a_r = (cB * target).sum(dim=1) / ((cB * cB).sum(dim=1) + _RC_EPS)  # (rows,)
    rB = a_r[:, None] * B * m  # (rows, c)
    a_c = (rB * target).sum(dim=0) / ((rB * rB).sum(dim=0) + _RC_EPS)  # (c,)
    return a_r, a_c


def rc1(W: Tensor, mask: Tensor, iters: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """First-order ARB-RC, no mean (§4.4; ref. `high_order_residual_alternating_order1_rc_nomean`).

    Ŵ = diag(a_r) B diag(a_c) ⊙ m with B = sign(w) fixed. Init a_r = mean_row |w|,
    a_c = mean_col |w / a_r| (masked means); then `iters` alternating least-squares steps
    a_r ← Σ_j a_c B w / Σ_j (a_c B)², a_c ← Σ_i a_r B w / Σ_i (a_r B)² (masked sums, +1e-8 in
    the denominators as in the reference). Differences from the reference: sign(0) = +1;
    rows whose init a_r is 0 are left out of the a_c init mean (the reference gets there
    through 0/0 = NaN and nanmean).

    Returns a_r (rows,), a_c (c,), signs (rows, c) bool.
    """
    w, m = _check(W, mask, iters)
    a_r, a_c, B = _rc_init(w, m)
    for _ in range(iters):
        a_r, a_c = _rc_als(w, m, B, a_c)
    return a_r, a_c, _out_signs(B, mask)


def rc2(W: Tensor, mask: Tensor, iters: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Second-order ARB-RC, no mean (§4.4; ref. `high_order_residual_alternating_order2_rc_nomean`).

    Ŵ = (diag(a_r¹) B₁ diag(a_c¹) + diag(a_r²) B₂ diag(a_c²)) ⊙ m. Init: term 1 by the rc1
    init on w, term 2 by the same init on the residual w − term₁. Each iteration:
    (a_r¹, a_c¹) by one ALS step against w − term₂, then (a_r², a_c²) against w − term₁ (new),
    then (B₁, B₂) jointly: per entry the nearest of ±c₁ ± c₂ to w with c_o = a_r^o a_c^o
    (ties to the first of −−, −+, +−, ++ as in the reference). Differences from the
    reference: sign(0) = +1; the a_c init skips rows with a_r = 0 (see rc1).

    Returns a_r (2, rows), a_c (2, c), signs (2, rows, c) bool.
    """
    w, m = _check(W, mask, iters)
    r1, k1, B1 = _rc_init(w, m)
    rho = (w - r1[:, None] * B1 * k1[None, :]) * m  # (rows, c)
    r2, k2, B2 = _rc_init(rho, m)
    for _ in range(iters):
        r1, k1 = _rc_als(w - r2[:, None] * B2 * k2[None, :] * m, m, B1, k1)
        r2, k2 = _rc_als(w - r1[:, None] * B1 * k1[None, :] * m, m, B2, k2)
        B1, B2 = _nearest4(w, r1[:, None] * k1[None, :], r2[:, None] * k2[None, :])
    return (torch.stack([r1, r2]), torch.stack([k1, k2]),
            torch.stack([_out_signs(B1, mask), _out_signs(B2, mask)]))
