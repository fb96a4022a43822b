"""Tests of the ARB-LLM refinement kernels (binllm/methods/arb_refine.py, ARB-LLM's alternating
refinement)."""

from __future__ import annotations

import math

import pytest
import torch

from binllm.methods.arb_refine import arb1, arb2, arb_x1, arb_x2, rc1, rc2

NAN, INF = float("nan"), float("inf")


# -- helpers: reconstructions and objectives written independently of the module ----------
def pm(signs):
    return signs.double() * 2 - 1


def arb_hat(alpha, mu, signs):
    """Ŵ = μ + Σ_o α_o B_o for order 1 (alpha (rows,)) or 2 (alpha (2, rows))."""
    if alpha.dim() == 1:
        alpha, signs = alpha[None], signs[None]
    Q = mu.double()[:, None].expand(signs.shape[1:]).clone()
    for o in range(alpha.shape[0]):
        Q = Q + alpha[o].double()[:, None] * pm(signs[o])
    return Q


def rc_hat(a_r, a_c, signs):
    if a_r.dim() == 1:
        a_r, a_c, signs = a_r[None], a_c[None], signs[None]
    return sum(a_r[o].double()[:, None] * pm(signs[o]) * a_c[o].double()[None, :]
               for o in range(a_r.shape[0]))


def row_err(W, mask, Q):
    """‖(W − Q) ⊙ m‖² per row, fp64."""
    E = torch.where(mask, W.double() - Q, 0.0)
    return (E * E).sum(dim=1)


def row_err_S(W, mask, Q, S):
    """(e ⊙ m) S (e ⊙ m)ᵀ per row, fp64."""
    E = torch.where(mask, W.double() - Q, 0.0)
    return torch.einsum("rb,bc,rc->r", E, S.double(), E)


def random_case(seed, rows=12, cols=24, p=0.6):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    mask = torch.rand(rows, cols, generator=g) < p
    mask[0] = True       # one full row
    mask[1, :2] = False  # one row with a single masked entry
    mask[1, 2:] = False
    mask[1, 5] = True
    X = torch.randn(4 * cols, cols, generator=g) + 0.3 * torch.randn(1, cols, generator=g)
    S = X.T @ X / X.shape[0]
    return W, mask, S


# -- golden examples, worked by hand ------------------------------------------------------
def mean(xs):
    return sum(xs) / len(xs)


def sgn(x):
    return 1.0 if x >= 0 else -1.0


GOLD_ROWS = [[6.0, 0.0, 1.0, 1.0], [6.0, 0.0, 1.0, 1.0, 2.0]]
GOLD_COLS = [[0, 2, 3, 5], [1, 2, 4, 6, 7]]


def golden_block():
    W = torch.tensor([[100.0, -50.0, 0, 0, 7.0, 0, 1e6, -3.0],
                      [-9.0, 0, 0, 8.0, 0, 4.0, 0, 0]])
    mask = torch.zeros(2, 8, dtype=torch.bool)
    for r, (vals, cols) in enumerate(zip(GOLD_ROWS, GOLD_COLS)):
        for v, c in zip(vals, cols):
            W[r, c] = v
            mask[r, c] = True
    return W, mask


def test_arb1_golden_one_iteration_matches_hand_computation():
    W, mask = golden_block()
    alpha0, mu0, s0 = arb1(W, mask, iters=0)
    alpha1, mu1, s1 = arb1(W, mask, iters=1)
    for r, (w, cols) in enumerate(zip(GOLD_ROWS, GOLD_COLS)):
        m0 = mean(w)                                      # BiLLM init
        a0 = mean([abs(x - m0) for x in w])
        b0 = [sgn(x - m0) for x in w]
        m1 = mean([x - a0 * b for x, b in zip(w, b0)])    # μ ← mean(w − αB)
        a1 = mean([b * (x - m1) for x, b in zip(w, b0)])  # α ← Σ B(w − μ) / n
        b1 = [sgn(x - m1) for x in w]                     # B ← sign(w − μ)
        assert alpha0[r].item() == pytest.approx(a0, abs=1e-6)
        assert mu0[r].item() == pytest.approx(m0, abs=1e-6)
        assert alpha1[r].item() == pytest.approx(a1, abs=1e-6)
        assert mu1[r].item() == pytest.approx(m1, abs=1e-6)
        assert pm(s0[r, cols]).tolist() == b0
        assert pm(s1[r, cols]).tolist() == b1
    # the same numbers written out: row 0 → μ 2 → 3, α 2 → 2.5; row 1 → μ 2 → 2.32,
    # α 1.6 → 1.664 and its last entry (w = 2 = μ₀, sign +1) flips to −1
    assert mu1.tolist() == pytest.approx([3.0, 2.32], abs=1e-6)
    assert alpha1.tolist() == pytest.approx([2.5, 1.664], abs=1e-6)
    assert s0[1, 7].item() is True and s1[1, 7].item() is False
    assert s1[~mask].all()  # unmasked positions hold True


def test_arb_x1_golden_diagonal_S_matches_hand_computation():
    W, mask = golden_block()
    s = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    S = torch.diag(torch.tensor(s))
    alpha, mu, signs = arb_x1(W, mask, S, iters=1, arb_iters=0)
    for r, (w, cols) in enumerate(zip(GOLD_ROWS, GOLD_COLS)):
        d = [s[c] for c in cols]
        m0 = mean(w)
        a0 = mean([abs(x - m0) for x in w])
        b0 = [sgn(x - m0) for x in w]
        m1 = sum(di * (x - a0 * b) for di, x, b in zip(d, w, b0)) / sum(d)
        a1 = sum(di * b * (x - m1) for di, x, b in zip(d, w, b0)) / sum(d)  # BᵀSB = Σ d
        assert mu[r].item() == pytest.approx(m1, abs=1e-6)
        assert alpha[r].item() == pytest.approx(a1, abs=1e-6)
        assert pm(signs[r, cols]).tolist() == b0
    # row 0 by hand: S weights 1, 3, 4, 6 on w − α₀B₀ = 4, 2, 3, 3 → μ = 40/14
    assert mu[0].item() == pytest.approx(20 / 7, abs=1e-6)


def test_arb_x1_with_identity_S_equals_weight_space_mu_alpha_step():
    W, mask, _ = random_case(3)
    a_x, mu_x, s_x = arb_x1(W, mask, torch.eye(W.shape[1]), iters=1, arb_iters=0)
    a_1, mu_1, _ = arb1(W, mask, iters=1)  # same μ, α step (its B update comes after)
    _, _, s_0 = arb1(W, mask, iters=0)
    torch.testing.assert_close(mu_x, mu_1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a_x, a_1, atol=1e-6, rtol=1e-5)
    assert torch.equal(s_x, s_0)


def test_rc1_golden_tiny_matrix_matches_hand_computation():
    w = [[1.0, -2.0, 4.0], [-3.0, 6.0, 0.5]]
    W = torch.tensor(w)
    mask = torch.ones(2, 3, dtype=torch.bool)
    ar0 = [mean([abs(x) for x in row]) for row in w]                        # [7/3, 9.5/3]
    ac0 = [mean([abs(w[i][j]) / ar0[i] for i in range(2)]) for j in range(3)]
    ar1 = [sum(ac0[j] * abs(w[i][j]) for j in range(3)) / sum(c * c for c in ac0)
           for i in range(2)]                                                # B·w = |w|
    ac1 = [sum(ar1[i] * abs(w[i][j]) for i in range(2)) / sum(r * r for r in ar1)
           for j in range(3)]
    r0, c0, s0 = rc1(W, mask, iters=0)
    r1, c1, s1 = rc1(W, mask, iters=1)
    assert r0.tolist() == pytest.approx(ar0, rel=1e-6)
    assert r0.tolist() == pytest.approx([7 / 3, 9.5 / 3], rel=1e-6)
    assert c0.tolist() == pytest.approx(ac0, rel=1e-6)
    assert r1.tolist() == pytest.approx(ar1, rel=1e-6)
    assert c1.tolist() == pytest.approx(ac1, rel=1e-6)
    assert s1.tolist() == [[True, False, True], [False, True, True]] == s0.tolist()


# -- objective never increases ------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_each_weight_space_iteration_does_not_increase_masked_error(seed):
    W, mask, _ = random_case(seed)
    kernels = {"arb1": (arb1, arb_hat), "arb2": (arb2, arb_hat),
               "rc1": (rc1, rc_hat), "rc2": (rc2, rc_hat)}
    for name, (fn, hat) in kernels.items():
        errs = [row_err(W, mask, hat(*fn(W, mask, iters=k))) for k in range(7)]
        if name.startswith("rc"):  # a_c couples the rows: only the total error is monotone
            errs = [e.sum() for e in errs]
        for k in range(6):
            assert (errs[k + 1] <= errs[k] * (1 + 1e-5) + 1e-12).all(), (name, k)
        assert errs[6].sum() < errs[0].sum(), name  # and it does improve somewhere


@pytest.mark.parametrize("seed", [0, 1])
def test_each_x_space_iteration_does_not_increase_S_weighted_error(seed):
    W, mask, S = random_case(seed)
    for fn in (arb_x1, arb_x2):
        errs = [row_err_S(W, mask, arb_hat(*fn(W, mask, S, iters=k, arb_iters=4)), S)
                for k in range(7)]
        for k in range(6):
            assert (errs[k + 1] <= errs[k] * (1 + 1e-5) + 1e-12).all(), (fn.__name__, k)
        assert errs[6].sum() < errs[0].sum(), fn.__name__


def test_x_space_phase_keeps_signs_of_the_weight_space_phase():
    W, mask, S = random_case(5)
    assert torch.equal(arb_x1(W, mask, S, iters=6, arb_iters=3)[2], arb1(W, mask, 3)[2])
    assert torch.equal(arb_x2(W, mask, S, iters=6, arb_iters=3)[2], arb2(W, mask, 3)[2])


# -- ARB-RC recovers an exact row/column factorization ------------------------------------
def test_rc1_recovers_diag_r_sign_diag_c_exactly():
    g = torch.Generator().manual_seed(7)
    r = torch.rand(10, generator=g) + 0.2
    c = torch.rand(20, generator=g) + 0.2
    signs = torch.rand(10, 20, generator=g) < 0.5
    W = r[:, None] * pm(signs).float() * c[None, :]
    mask = torch.ones_like(signs)
    for iters in (0, 15):
        a_r, a_c, s = rc1(W, mask, iters=iters)
        assert torch.equal(s, signs)
        assert (rc_hat(a_r, a_c, s) - W.double()).abs().max().item() < 2e-6


# -- masks ---------------------------------------------------------------------------------
def all_kernels(S):
    return {"arb1": lambda W, m: arb1(W, m), "arb2": lambda W, m: arb2(W, m),
            "arb_x1": lambda W, m: arb_x1(W, m, S), "arb_x2": lambda W, m: arb_x2(W, m, S),
            "rc1": lambda W, m: rc1(W, m), "rc2": lambda W, m: rc2(W, m)}


def test_rows_with_empty_mask_give_zero_scales_and_means_without_nan():
    W, mask, S = random_case(2)
    mask[3] = False
    mask[:, 4] = False  # an empty column too (ARB-RC's column scale must be 0 there)
    for name, fn in all_kernels(S).items():
        out = fn(W, mask)
        for t in out[:2]:
            assert torch.isfinite(t).all(), name
        scale, second = out[0], out[1]
        if name.startswith("rc"):  # (a_r, a_c)
            assert (scale[..., 3] == 0).all() and (second[..., 4] == 0).all(), name
        else:  # (alpha, mu)
            assert (scale[..., 3] == 0).all() and second[3] == 0, name
        assert out[2][..., 3, :].all() and out[2][..., 4].all(), name  # unmasked → True


def test_entries_outside_the_mask_do_not_affect_the_result():
    W, mask, S = random_case(4)
    junk = torch.randn(W.shape) * 1e3
    junk[0, :3] = torch.tensor([NAN, INF, -INF])
    W2 = torch.where(mask, W, junk)
    mask[0, :3] = False
    for name, fn in all_kernels(S).items():
        a, b = fn(W, mask), fn(W2, mask)
        for x, y in zip(a, b):
            assert torch.equal(x, y), name


def test_outputs_are_fp32_whatever_the_input_dtype():
    W, mask, S = random_case(6)
    for dtype in (torch.float16, torch.float64):
        for name, fn in all_kernels(S.to(dtype)).items():
            out = fn(W.to(dtype), mask)
            assert out[0].dtype == out[1].dtype == torch.float32, (name, dtype)
            assert out[2].dtype == torch.bool, name


# -- naive per-row oracles ----------------------------------------------------------------
def arb1_row(w, iters):
    if not w:
        return 0.0, 0.0, []
    mu = mean(w)
    a = mean([abs(x - mu) for x in w])
    B = [sgn(x - mu) for x in w]
    for _ in range(iters):
        mu = mean([x - a * b for x, b in zip(w, B)])
        a = mean([b * (x - mu) for x, b in zip(w, B)])
        B = [sgn(x - mu) for x in w]
    return a, mu, B


def arb2_row(w, iters):
    if not w:
        return (0.0, 0.0), 0.0, ([], [])
    m1 = mean(w)
    a1 = mean([abs(x - m1) for x in w])
    B1 = [sgn(x - m1) for x in w]
    rho = [x - a1 * b - m1 for x, b in zip(w, B1)]
    m2 = mean(rho)
    a2 = mean([abs(x - m2) for x in rho])
    B2 = [sgn(x - m2) for x in rho]
    mu = m1 + m2
    for _ in range(iters):
        mu = mean([x - a1 * b1 - a2 * b2 for x, b1, b2 in zip(w, B1, B2)])
        a1 = mean([b1 * (x - mu - a2 * b2) for x, b1, b2 in zip(w, B1, B2)])
        a2 = mean([b2 * (x - mu - a1 * b1) for x, b1, b2 in zip(w, B1, B2)])
        cands = [(-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)]
        best = [min(cands, key=lambda s: abs(x - mu - s[0] * a1 - s[1] * a2)) for x in w]
        B1, B2 = [s[0] for s in best], [s[1] for s in best]
    return (a1, a2), mu, (B1, B2)


@pytest.mark.parametrize("iters", [0, 1, 15])
def test_arb1_batched_equals_per_row_loop_oracle(iters):
    W, mask, _ = random_case(11)
    mask[2] = False
    alpha, mu, signs = arb1(W, mask, iters=iters)
    for r in range(W.shape[0]):
        cols = mask[r].nonzero().flatten().tolist()
        a, m, B = arb1_row([W[r, c].item() for c in cols], iters)
        assert alpha[r].item() == pytest.approx(a, abs=1e-6)
        assert mu[r].item() == pytest.approx(m, abs=1e-6)
        assert pm(signs[r, cols]).tolist() == B


@pytest.mark.parametrize("iters", [0, 1, 15])
def test_arb2_batched_equals_per_row_loop_oracle(iters):
    W, mask, _ = random_case(12)
    mask[2] = False
    alpha, mu, signs = arb2(W, mask, iters=iters)
    for r in range(W.shape[0]):
        cols = mask[r].nonzero().flatten().tolist()
        (a1, a2), m, (B1, B2) = arb2_row([W[r, c].item() for c in cols], iters)
        assert alpha[0, r].item() == pytest.approx(a1, abs=1e-6)
        assert alpha[1, r].item() == pytest.approx(a2, abs=1e-6)
        assert mu[r].item() == pytest.approx(m, abs=1e-6)
        assert pm(signs[0, r, cols]).tolist() == B1
        assert pm(signs[1, r, cols]).tolist() == B2


# -- input checks ----------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    W, mask, S = random_case(0)
    with pytest.raises(ValueError, match="mask shape"):
        arb1(W, mask[:, :-1])
    with pytest.raises(ValueError, match="bool"):
        arb2(W, mask.float())
    with pytest.raises(ValueError, match="iters"):
        rc1(W, mask, iters=-1)
    with pytest.raises(ValueError, match="arb_iters"):
        arb_x1(W, mask, S, arb_iters=1.5)
    with pytest.raises(ValueError, match="Gram matrix"):
        arb_x2(W, mask, S[:-1, :-1])
    with pytest.raises(ValueError, match="2-D"):
        rc2(W[0], mask[0])
    assert math.isfinite(arb1(W, mask)[0].sum().item())


def test_x_space_keeps_weight_space_values_where_S_gives_no_weight():
    W, mask, S = random_case(8)
    dead = torch.zeros(W.shape[1], dtype=torch.bool)
    dead[:6] = True
    S = S.clone()
    S[dead], S[:, dead] = 0.0, 0.0  # inputs of columns 0..5 are always zero
    mask[4] = False
    mask[4, :6] = True  # row 4 only covers dead columns: S says nothing about it
    for fn, base in ((arb_x1, arb1), (arb_x2, arb2)):
        a_x, mu_x, _ = fn(W, mask, S, iters=5, arb_iters=2)
        a_w, mu_w, _ = base(W, mask, 2)
        assert torch.isfinite(a_x).all() and torch.isfinite(mu_x).all()
        assert torch.equal(a_x[..., 4], a_w[..., 4]) and mu_x[4] == mu_w[4], fn.__name__
        assert not torch.equal(mu_x, mu_w), fn.__name__  # other rows did move
