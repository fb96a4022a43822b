"""ARB-LLM methods (Li et al. 2025): golden 4×8 block, CGB and ARB-X searches against naive
loops, num_p, codes of every registered name, end to end on stories260K."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import correlated

from binllm.methods import METHODS, MethodArgumentError, get_method
from binllm.methods.arbllm import ARBRC, ARBX, x_split_errors
from binllm.methods.base import BlockContext
from binllm.methods.bra import quantiles
from binllm.engine.reconstruct import reconstruct

ARB_NAMES = ["arb", "arb-x", "arb-rc", "arb-llm-x", "arb-llm-rc"]

# The golden block of test_billm: salient columns 0 and 5, ±3 sparse, ±1 concentrated.
W_GOLD = torch.tensor([[8., 1, -1, 3, 1, -10, -1, 1],
                       [-9, -1, 1, 1, -3, 7, 1, -1],
                       [10, 1, 3, -1, -1, -8, 1, 1],
                       [-7, -1, -1, 1, 1, 8, 3, -3]])
CTX_GOLD = BlockContext(H=2 * torch.eye(8), U=torch.eye(8), columns=slice(0, 8))  # S = I
GROUPS_GOLD = torch.tensor([[0, 2, 2, 1, 2, 0, 2, 2],
                            [0, 2, 2, 2, 1, 0, 2, 2],
                            [0, 2, 1, 2, 2, 0, 2, 2],
                            [0, 2, 2, 2, 2, 0, 1, 1]], dtype=torch.uint8)


def bra_row(vals, order):
    """Independent BRA of one list of values (pure Python): the approximation."""
    n = len(vals)
    approx = [0.0] * n
    for _ in range(order):
        rho = [v - a for v, a in zip(vals, approx)]
        mu = sum(rho) / n if n else 0.0
        alpha = sum(abs(r - mu) for r in rho) / n if n else 0.0
        approx = [a + (alpha if r - mu >= 0 else -alpha) + mu for a, r in zip(approx, rho)]
    return approx


def bra_matrix(X, mask, order):
    """BRA approximation of every row's masked entries, zero elsewhere."""
    out = torch.zeros_like(X)
    for r in range(X.shape[0]):
        idx = [j for j in range(X.shape[1]) if mask[r, j]]
        for j, a in zip(idx, bra_row([float(X[r, j]) for j in idx], order)):
            out[r, j] = a
    return out


# -- golden ----------------------------------------------------------------------------------
def test_golden_arb_same_masks_as_billm_and_exact_refinement():
    c = get_method("arb").fit(W_GOLD, CTX_GOLD)
    assert torch.equal(c.group, GROUPS_GOLD) and c.orders == (2, 1, 1)
    # concentrated, row 0: [1, −1, 1, −1, 1] with B = [+, −, +, −, +] fixed after the init:
    # μ ← mean(w − αB) = 0.2 − 0.2α, α ← mean(B(w − μ)) = 1 − 0.2μ, so μ_{t+1} = 0.04 μ_t:
    # from μ₀ = 0.2 after 15 iterations μ = 0.2·0.04¹⁵ ≈ 2e−22 (0 in fp16), α = 1 — exact,
    # where BiLLM keeps μ = 0.2, α = 0.96.
    assert c.mu[2, :, 0].tolist() == [0.0] * 4
    assert c.alpha[2, 0, :, 0].tolist() == [1.0] * 4
    # salient row 0 [8, −10]: μ = −1, α₁ = 9, α₂ = 0 (exact from the init on)
    assert c.mu[0, 0, 0].item() == -1 and c.alpha[0, :, 0, 0].tolist() == [9, 0]
    assert c.signs[0, 0].tolist() == [True, True, False, True, True, False, False, True]
    assert torch.equal(c.dequantize(), W_GOLD)


def test_golden_arb_x_with_identity_gram_is_exact_too():
    c = get_method("arb-x").fit(W_GOLD, CTX_GOLD)  # S = H/2 = I: X-space = weight space
    assert torch.equal(c.group, GROUPS_GOLD)
    assert torch.equal(c.dequantize(), W_GOLD)


def test_golden_arb_rc_row_and_column_scales_without_mean():
    c = get_method("arb-rc").fit(W_GOLD, CTX_GOLD)
    assert torch.equal(c.group, GROUPS_GOLD)
    assert c.mu is None and c.beta.shape == (3, 2, 8)
    # concentrated |w| = 1 everywhere: a_r = mean_row |w| = 1, a_c = 1, B = sign(w)
    assert c.alpha[2, 0, :, 0].tolist() == [1.0] * 4
    assert c.beta[2, 0, [1, 2, 3, 4, 6, 7]].tolist() == [1.0] * 6
    # sparse |w| = 3: a_r = 3, a_c = 1
    assert c.alpha[1, 0, :, 0].tolist() == [3.0] * 4
    Q = c.dequantize()
    rest = c.group != 0
    assert torch.equal(Q[rest], W_GOLD[rest])
    torch.testing.assert_close(Q[~rest], W_GOLD[~rest], rtol=2e-3, atol=0)  # shared a_c


def test_golden_cgb_keeps_all_salient_weights_large_when_every_split_is_exact():
    # two salient weights per row: R₂ is exact on any split, so every candidate has error 0
    # and the first quantile (0.1 of the non-zero s: 49) wins; |s| ≥ 49 holds everywhere.
    c = get_method("arb-llm-x").fit(W_GOLD, CTX_GOLD)
    assert c.n_salient == 2 and c.orders == (2, 2, 1, 1)
    assert torch.equal(c.group == 0, GROUPS_GOLD == 0) and not (c.group == 1).any()
    assert torch.equal(c.dequantize(), W_GOLD)


# -- searches against naive loops -----------------------------------------------------------
def naive_cgb(x, s, sal):
    levels = torch.linspace(0.10, 0.90, 81).numpy()
    v = (s * sal).abs().reshape(-1).numpy()
    best, best_p = math.inf, None
    for p in np.quantile(v[v != 0], levels):
        small = sal & (s.abs() < float(p))
        approx = bra_matrix(x, small, 2) + bra_matrix(x, sal & ~small, 2)
        e = ((x - approx) ** 2).sum().item()
        if e < best:
            best, best_p = e, float(p)
    return sal & (s.abs() >= best_p)


@pytest.mark.parametrize("seed", [0, 1])
def test_cgb_split_equals_the_naive_loop(seed):
    W, H = correlated(6, 16, seed=seed)
    W[:, :4] *= 4  # a few clearly salient columns
    U = torch.linalg.cholesky(torch.linalg.inv(H + 0.01 * torch.eye(16)), upper=True)
    ctx = BlockContext(H=H, U=U, columns=slice(0, 16))
    c = get_method("arb-llm-rc").fit(W, ctx)
    s = W ** 2 / torch.diag(U) ** 2
    sal = c.salient_cols[None, :].expand(6, -1)
    assert torch.equal(c.group == 0, naive_cgb(s, s, sal))
    assert torch.equal(c.group <= 1, sal)


def test_arb_x_split_errors_equal_explicit_trace():
    g = torch.Generator().manual_seed(3)
    W, H = correlated(5, 12, seed=3)
    S = H / 2
    s = W ** 2
    region = torch.ones(5, 12, dtype=torch.bool)
    region[:, [2, 7]] = False
    fixed = torch.where(region, 0.0, torch.randn(5, 12, generator=g))
    p = quantiles((s * region).abs())
    got = x_split_errors(s, s, region, p, fixed, S)
    for i in (0, 20, 40, 60, 80):
        small = region & (s.abs() < p[i])
        E = s - fixed - bra_matrix(s, small, 1) - bra_matrix(s, region & ~small, 1)
        want = torch.trace(E.double() @ S.double() @ E.double().T).item()
        assert got[i].item() == pytest.approx(want, rel=1e-4)
    # measured on W with groups by s (search_target="weight"): same formula, brute force
    got_w = x_split_errors(W, s, region, p, fixed, S)
    small = region & (s.abs() < p[30])
    E = W - fixed - bra_matrix(W, small, 1) - bra_matrix(W, region & ~small, 1)
    assert got_w[30].item() == pytest.approx(torch.trace(E @ S @ E.T).item(), rel=1e-4)


# -- num_p, presets, options --------------------------------------------------------------------
@pytest.mark.parametrize("name,cgb_groups", [("arb", 1), ("arb-x", 1), ("arb-rc", 1),
                                             ("arb-llm-x", 3), ("arb-llm-rc", 3)])
def test_num_p_two_gives_p_plus_one_groups_partitioning_the_block(name, cgb_groups):
    W, H = correlated(seed=7)
    rec = reconstruct(W, H, get_method(name, {"num_p": 2}), block_size=48)
    c = rec.codes
    assert c.n_salient == cgb_groups and len(c.orders) == cgb_groups + 3
    assert c.orders == (2,) * cgb_groups + (1, 1, 1)
    sal = c.salient_cols[None, :].expand_as(c.group)
    assert torch.equal(c.group < c.n_salient, sal)
    assert torch.equal(c.dequantize(), rec.Q)


def test_presets_are_arb_x_and_arb_rc_with_cgb():
    assert METHODS["arb-llm-x"].cls is ARBX and METHODS["arb-llm-x"].preset == {"cgb": True}
    assert METHODS["arb-llm-rc"].cls is ARBRC and METHODS["arb-llm-rc"].preset == {"cgb": True}
    assert get_method("arb-llm-x").args.cgb and not get_method("arb-x").args.cgb


@pytest.mark.parametrize("overrides", [{"salient_metric": "magnitude"}, {"hessian_diag": "inverse"},
                                       {"search_target": "weight"}, {"iters": 0},
                                       {"intra_block": True}])
@pytest.mark.parametrize("name", ["arb-llm-x", "arb-llm-rc"])
def test_options_run_and_codes_reproduce_Q(name, overrides):
    W, H = correlated(seed=1)
    rec = reconstruct(W, H, get_method(name, overrides), block_size=48)
    assert torch.equal(rec.codes.dequantize(), rec.Q)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(MethodArgumentError, match="num_p"):
        get_method("arb", {"num_p": 0})
    with pytest.raises(MethodArgumentError, match="x_iters"):
        get_method("arb", {"x_iters": 3})  # only ARB-X has X-space iterations
    with pytest.raises(MethodArgumentError, match="Hessian"):
        get_method("arb-x", {"salient_metric": "magnitude"}).fit(
            W_GOLD, BlockContext(H=None, U=None, columns=slice(0, 8)))


# -- every registered name ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["billm"] + ARB_NAMES)
def test_codes_reproduce_Q_exactly_and_count_bits(name):
    W, H = correlated(seed=2)
    rec = reconstruct(W, H, get_method(name), block_size=32)
    assert torch.equal(rec.codes.dequantize(), rec.Q)
    assert 1.0 <= rec.codes.paper_bits() <= 2.0
    assert rec.codes.stored_bits() / W.numel() > rec.codes.paper_bits()
    again = reconstruct(W, H, get_method(name), block_size=32)
    assert torch.equal(again.Q, rec.Q)  # deterministic


@pytest.mark.parametrize("name", ARB_NAMES)
def test_arb_variants_beat_billm_in_hessian_weighted_error(name):
    W, H = correlated(seed=6)

    def err(Q):
        return torch.einsum("rc,cd,rd->", W - Q, H, W - Q).item()

    billm = reconstruct(W, H, get_method("billm"), block_size=32).Q
    assert err(reconstruct(W, H, get_method(name), block_size=32).Q) < err(billm)


@pytest.mark.parametrize("name", ARB_NAMES)
def test_end_to_end_stories260k(name, stories_model, stories_tokenizer, shared):
    from binllm.engine.binarize import binarize_model
    from binllm.engine.config import QuantizeConfig
    from binllm.evaluation.data import calibration_batches, eval_tokens, load_text
    from binllm.evaluation.perplexity import perplexity

    calib = calibration_batches(load_text("tinystories", "train", shared / "data"),
                                stories_tokenizer, nsamples=4, seqlen=128, seed=0)
    tokens = eval_tokens(load_text("tinystories", "validation", shared / "data"),
                         stories_tokenizer, 256)
    report = binarize_model(stories_model, QuantizeConfig(name), calib)
    assert len(report.linears) == 5 * 7
    for lin, codes in report.codes.items():
        assert torch.equal(codes.dequantize(), stories_model.get_submodule(lin).weight.data)
    assert 1.0 < report.paper_bits < 2.0
    assert math.isfinite(perplexity(stories_model, tokens, 256, max_windows=2).ppl)


def test_x_warm_iters_chooses_the_weight_space_start_of_arb_x():
    """None = `iters` (reference); 0 = X-space steps straight from the BiLLM init (paper)."""
    from binllm.methods import arb_refine
    from binllm.methods.base import MethodArgumentError

    g = torch.Generator().manual_seed(3)
    W = torch.randn(12, 40, generator=g)
    X = torch.randn(160, 40, generator=g) * torch.linspace(0.3, 2.0, 40)
    H = 2 / 160 * X.T @ X
    mask = torch.rand(12, 40, generator=g) > 0.3
    for warm, want in [(None, 15), (15, 15), (0, 0)]:
        m = get_method("arb-x", {} if warm is None else {"x_warm_iters": str(warm)})
        fit = m.binarize(W, mask, 1, H / 2)
        a, mu, _ = arb_refine.arb_x1(W, mask, H / 2, iters=15, arb_iters=want)
        assert torch.equal(fit.alpha[0], a) and torch.equal(fit.mu, mu)
    default = reconstruct(W, H, get_method("arb-x", {})).Q
    assert torch.equal(reconstruct(W, H, get_method("arb-x", {"x_warm_iters": "15"})).Q, default)
    assert not torch.equal(reconstruct(W, H, get_method("arb-x", {"x_warm_iters": "0"})).Q,
                           default)
    with pytest.raises(MethodArgumentError, match="x_warm_iters=-1"):
        get_method("arb-x", {"x_warm_iters": "-1"})
