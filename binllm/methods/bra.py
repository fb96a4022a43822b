"""BiLLM's binary residual approximation (BRA) and its mask searches, batched.

BRA of order k on a masked set of each row (BiLLM, Huang et al. 2024, and its reference code):

    ρ ← x ⊙ m, A ← 0
    k times:  μ = mean_m ρ,  α = mean_m |ρ − μ|,  β = sign(ρ − μ),
              A += (α β + μ) ⊙ m,  ρ ← x ⊙ m − A

The searches (§3.2, §4.4b, §4.5) compare many candidate masks by the squared error of BRA.
The reference code re-runs BRA per candidate in Python loops. Here every candidate set is a
range of each row's *sorted* values (splits by |x| < p) or a prefix of the top columns
(salient-column counts), so the error of BRA of order 1 or 2 follows in closed form from
prefix sums (count, Σx, Σx²) over the sorted values, queried with `searchsorted`:

    E₁ = Σ(x − μ)² − n α²                      (β(x − μ) = |x − μ| for every x)
    E₂ = Σ(ρ − μ₂)² − n α₂²,  ρ = x − μ₁ ∓ α₁  (the two halves of the first order)

and Σ|x − c| over a set comes from the count and sum of the part below c. All candidates
are evaluated at once in float64. sign(0) is +1 here (one bit per weight); the reference's
torch.sign gives 0, which differs only on exact ties.

| symbol | meaning                                              | shape            |
|--------|------------------------------------------------------|------------------|
| x      | matrix whose approximation error is measured         | (rows, B)        |
| m      | boolean mask of a group                              | (rows, B)        |
| μ, α   | per-row mean and scale of one order                  | (rows,)          |
| p      | split thresholds (candidates) on |x|                 | (ncand,)         |
| vs     | each row's sorted values (+inf where outside the set) | (rows, B)       |
| P      | prefix sums (count, Σx, Σx²) of vs                   | 3 × (rows, B+1)  |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

SPLIT_LEVELS = (0.10, 0.90, 81)  # quantile levels of the bell-shaped split search (§3.2.3)
_CHUNK = 1 << 17                 # elements per partial sum over rows of the count search
_ROW_TABLE = 1 << 19             # elements per (rows, cand, B) table (4 MiB in float64)


class BRA(NamedTuple):
    """Result of `residual_binarize`: per-order scales, the summed mean, signs and Ŵ."""

    alpha: Tensor   # (order, ..., rows)
    mu: Tensor      # (..., rows)   μ₁ + … + μ_k
    signs: Tensor   # (order, ..., rows, B) bool, True = +1
    approx: Tensor  # (..., rows, B), zero outside the mask


def residual_binarize(x: Tensor, mask: Tensor, order: int) -> BRA:
    """BRA of `order` on the masked entries of each row of x (leading dims are batched).

    Rows without masked entries get μ = α = 0.
    """
    m = mask.to(x.dtype)  # (..., rows, B)
    n = m.sum(-1).clamp(min=1)  # (..., rows)
    target = x * m
    approx = torch.zeros_like(target)
    alphas, signs, mu = [], [], torch.zeros_like(n)
    for _ in range(order):
        rho = target - approx  # (..., rows, B)
        mu_o = (rho * m).sum(-1) / n  # (..., rows)
        d = rho - mu_o[..., None]
        alpha_o = (d.abs() * m).sum(-1) / n  # (..., rows)
        sign = d >= 0
        approx = approx + (alpha_o[..., None] * (sign.to(x.dtype) * 2 - 1) + mu_o[..., None]) * m
        alphas.append(alpha_o)
        signs.append(sign & mask)
        mu = mu + mu_o
    return BRA(torch.stack(alphas), mu, torch.stack(signs), approx)


# -- closed-form BRA error from sorted statistics -----------------------------------------
# A "stats" tensor stacks (count, Σx, Σx²) of a set of values on its first dim: (3, ...) float64.
def bra_error(total: Tensor, below: Callable[[Tensor], Tensor], order: int) -> Tensor:
    """Σ (x − R_order(x))² over a set, from its stats `total` and `below(t)` = stats of {x < t}.

    Works elementwise on any shape (rows, candidates, …); empty sets give 0.
    """
    n, s1, s2 = total
    safe = n.clamp(min=1)
    mu1 = s1 / safe
    c, l1, l2 = below(mu1)  # the − half of the first order: x < μ₁
    alpha1 = ((s1 - l1) - mu1 * (n - c) + mu1 * c - l1) / safe
    if order == 1:
        return (s2 - 2 * mu1 * s1 + n * mu1 ** 2) - n * alpha1 ** 2
    if order != 2:
        raise ValueError(f"order={order}: the closed-form search supports orders 1 and 2")
    ap, am = mu1 + alpha1, mu1 - alpha1  # reconstruction of the + and − halves
    n_p, s_p, q_p = n - c, s1 - l1, s2 - l2
    rho_sum = (s_p - n_p * ap) + (l1 - c * am)
    rho_sq = (q_p - 2 * ap * s_p + n_p * ap ** 2) + (l2 - 2 * am * l1 + c * am ** 2)
    mu2 = rho_sum / safe
    cp, cm = ap + mu2, am + mu2  # ρ − μ₂ = 0 at x = cp (+ half) and x = cm (− half)
    k_hi, t_hi, _ = below(torch.maximum(cp, mu1))
    k1, t1 = k_hi - c, t_hi - l1  # + half below cp: μ₁ ≤ x < cp
    k_lo, t_lo, _ = below(torch.minimum(cm, mu1))
    k2, t2 = c - k_lo, l1 - t_lo  # − half at or above cm: cm ≤ x < μ₁
    abs_p = (s_p - cp * n_p) + 2 * (cp * k1 - t1)
    abs_m = (cm * c - l1) + 2 * (t2 - cm * k2)
    alpha2 = (abs_p + abs_m) / safe
    return rho_sq - n * mu2 ** 2 - n * alpha2 ** 2


def _sorted_prefix(x: Tensor, inside: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's values inside the set, sorted (+inf after them); prefix stats (3, rows, B+1)."""
    vs = torch.sort(torch.where(inside, x.float(), torch.inf), dim=-1).values.double()  # (rows, B)
    fin = torch.isfinite(vs)
    f = torch.where(fin, vs, 0.0)
    P = torch.zeros(3, *f.shape[:-1], f.shape[-1] + 1, dtype=torch.float64, device=x.device)
    torch.cumsum(torch.stack([fin.double(), f, f * f]), -1, out=P[..., 1:])
    return vs, P


def _at(P: Tensor, idx: Tensor) -> Tensor:
    """Prefix stats at sorted positions idx (rows, m): (3, rows, m)."""
    return P.gather(-1, idx[None].expand(3, *idx.shape))


def _ranges_below(P: Tensor, vs: Tensor, ranges):
    """below(t) for the union of sorted-position ranges [lo, hi) (lo None = 0)."""
    def below(t: Tensor) -> Tensor:
        j = torch.searchsorted(vs, t.contiguous())
        out = 0
        for lo, hi in ranges:
            if lo is None:
                out = out + _at(P, torch.minimum(j, hi))
            else:
                out = out + _at(P, torch.minimum(torch.maximum(j, lo), hi)) - _at(P, lo)
        return out
    return below


def _total(P: Tensor, ranges) -> Tensor:
    out = 0
    for lo, hi in ranges:
        out = out + _at(P, hi) - (0 if lo is None else _at(P, lo))
    return out


def _split_sets(x: Tensor, region: Tensor, p: Tensor):
    """Sorted prefix stats of `region` and, per candidate p, the index ranges of both parts.

    {|x| < p} = {−p < x < p} = sorted positions [a, b); {|x| ≥ p} = [0, a) ∪ [b, n).
    """
    rows = x.shape[0]
    vs, P = _sorted_prefix(x, region)
    n_r = region.sum(-1, keepdim=True).expand(rows, p.numel()).contiguous()  # (rows, ncand)
    pp = p.double()[None, :].expand(rows, -1).contiguous()  # (rows, ncand)
    a = torch.searchsorted(vs, -pp, right=True)  # #{x ≤ −p}
    b = torch.maximum(torch.searchsorted(vs, pp), a)  # #{x < p}
    return vs, P, ([(a, b)], [(None, a), (b, n_r)])


def split_errors(x: Tensor, region: Tensor, p: Tensor, order: int) -> Tensor:
    """Σ-error of splitting `region` of each row into {|x| < p} and {|x| ≥ p}, per candidate p.

    Each part is approximated by BRA of `order`; returns (ncand,) float64 sums over rows
    (entries outside `region` are not counted).
    """
    vs, P, parts = _split_sets(x, region, p)
    err = sum(bra_error(_total(P, r), _ranges_below(P, vs, r), order) for r in parts)
    return err.sum(0)


def split_params(x: Tensor, region: Tensor, p: Tensor) -> tuple[Tensor, ...]:
    """First-order BRA (μ, α) of both parts of every split candidate, 4 × (rows, ncand) float64.

    Returns (mu_small, alpha_small, mu_large, alpha_large) for {|x| < p} and {|x| ≥ p}.
    """
    vs, P, parts = _split_sets(x, region, p)
    out = []
    for r in parts:
        n, s1, _ = _total(P, r)
        safe = n.clamp(min=1)
        mu = s1 / safe
        c, l1, _ = _ranges_below(P, vs, r)(mu)
        out += [mu, ((s1 - l1) - mu * (n - c) + mu * c - l1) / safe]
    return tuple(out)


# -- searches -----------------------------------------------------------------------------
def quantiles(values: Tensor, lo: float = SPLIT_LEVELS[0], hi: float = SPLIT_LEVELS[1],
              steps: int = SPLIT_LEVELS[2]) -> Tensor:
    """numpy-style 'linear' quantiles of a flat tensor at levels linspace(lo, hi, steps).

    Same as torch.quantile(values, levels) but without its size limit.
    """
    levels = torch.linspace(lo, hi, steps, device=values.device)  # float32 as the reference
    v = torch.sort(values.reshape(-1).to(torch.float32)).values
    if v.numel() == 0:
        return torch.zeros(steps, dtype=torch.float32, device=values.device)
    pos = levels * (v.numel() - 1)  # float32 ranks and torch.lerp, as torch.quantile
    return torch.lerp(v[pos.floor().long()], v[pos.ceil().long()], pos - pos.floor())


def salient_column_errors(x: Tensor, top: Tensor) -> Tensor:
    """error(k) = Σ (x − [R₂(x; S_k) + R₂(x; ¬S_k)])², S_k = columns top[:k], k = 1…len(top)−1.

    x (rows, B) is the matrix the error is measured on; top (U,) the candidate columns in
    order of decreasing score. Returns (U − 1,) float64.
    """
    rows = x.shape[0]
    U = top.numel()
    K = U - 1
    if K < 1:
        return torch.zeros(0, dtype=torch.float64, device=x.device)
    ks = torch.arange(1, U, device=x.device)  # (K,)
    vs_all, P_all = _sorted_prefix(x, torch.ones_like(x, dtype=torch.bool))
    errs = torch.zeros(K, dtype=torch.float64, device=x.device)
    step = max(1, _CHUNK // (K * (U + 1)))  # rows per partial sum (fixes the summation order)
    big = step * max(1, _ROW_TABLE // (step * K * (U + 1)))  # rows per table, a multiple
    for r0 in range(0, rows, big):
        r1 = min(rows, r0 + big)
        vt, rank = torch.sort(x[r0:r1][:, top].float(), dim=-1)  # (r, U); rank: place in `top`
        vt = vt.double()
        member = rank[:, None, :] < ks[None, :, None]  # (r, K, U): sorted value ∈ S_k
        g = torch.stack([torch.ones_like(vt), vt, vt * vt])[:, :, None, :]  # (3, r, 1, U)
        T = torch.cumsum(torch.where(member, g, 0.0), -1)  # (3, r, K, U): stats of the first j+1
        T = torch.cat([torch.zeros_like(T[..., :1]), T], -1)  # (3, r, K, U + 1)
        Pa, va = P_all[:, r0:r1], vs_all[r0:r1]

        def below_sal(t: Tensor, vt=vt, T=T) -> Tensor:
            j = torch.searchsorted(vt, t.contiguous())  # (r, K)
            return T.gather(-1, j[None, :, :, None].expand(3, -1, -1, 1))[..., 0]

        def below_rest(t: Tensor, Pa=Pa, va=va, below_sal=below_sal) -> Tensor:
            return _at(Pa, torch.searchsorted(va, t.contiguous())) - below_sal(t)

        sal = T[..., -1]  # (3, r, K)
        rest = Pa[..., -1:] - sal
        e = bra_error(sal, below_sal, 2) + bra_error(rest, below_rest, 2)  # (r, K) per row
        for j in range(0, r1 - r0, step):  # Σ over rows in the same partial sums as ever
            errs += e[j:j + step].sum(0)
    return errs


def salient_columns(x: Tensor, score: Tensor, up_lim: int) -> tuple[Tensor, Tensor]:
    """BiLLM's structured salient-column search (§3.2.2), up_lim clamped to the block width.

    Candidates: the top-k columns by `score` for k = 1 … U−1 (U = min(up_lim, B)); the
    first k with the smallest error wins (strict <, as the reference). A block of a single
    column makes it salient. Returns the boolean column mask (B,) and the errors (U−1,).
    """
    B = x.shape[1]
    U = min(up_lim, B)
    top = torch.topk(score, U).indices  # (U,)
    errs = salient_column_errors(x, top)
    k = int(torch.argmin(errs)) + 1 if errs.numel() else U
    cols = torch.zeros(B, dtype=torch.bool, device=x.device)
    cols[top[:k]] = True
    return cols, errs


def first_min(errors: Tensor, best: float = float("inf")) -> int | None:
    """Index of the first candidate strictly below `best` and all earlier ones; None if none."""
    if errors.numel() == 0:
        return None
    i = int(torch.argmin(errors))
    return i if errors[i] < best else None
