"""BiLLM (Huang et al. 2024): golden 4×8 block by hand, searches against naive loop oracles,
narrow blocks, determinism, options, end to end on stories260K."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import correlated

from binllm.methods import MethodArgumentError, get_method
from binllm.methods.base import BlockContext
from binllm.methods.billm import (block_saliency, inverse_diag, nearest_signs, search_split,
                                  split_masks)
from binllm.methods.bra import quantiles, residual_binarize, salient_columns
from binllm.engine.reconstruct import reconstruct

# Golden block. With U = I the saliency is s = W². Columns 0 and 5 hold the large weights;
# the rest are ±1 (concentrated) or ±3 (sparse). Every number below is exact in fp16
# except where rounded with fp16() explicitly.
W_GOLD = torch.tensor([[8., 1, -1, 3, 1, -10, -1, 1],
                       [-9, -1, 1, 1, -3, 7, 1, -1],
                       [10, 1, 3, -1, -1, -8, 1, 1],
                       [-7, -1, -1, 1, 1, 8, 3, -3]])
CTX_GOLD = BlockContext(H=2 * torch.eye(8), U=torch.eye(8), columns=slice(0, 8))


def fp16(x: float) -> float:
    return torch.tensor(x).half().float().item()


# -- independent naive oracles (pure Python, one row at a time) ---------------------------
def bra_row(vals: list[float], order: int):
    """BRA of a list: (alphas, mus, signs per order, approximation)."""
    n = len(vals)
    approx = [0.0] * n
    alphas, mus, signs = [], [], []
    for _ in range(order):
        rho = [v - a for v, a in zip(vals, approx)]
        mu = sum(rho) / n if n else 0.0
        alpha = sum(abs(r - mu) for r in rho) / n if n else 0.0
        sg = [r - mu >= 0 for r in rho]
        approx = [a + (alpha if s else -alpha) + mu for a, s in zip(approx, sg)]
        alphas.append(alpha), mus.append(mu), signs.append(sg)
    return alphas, mus, signs, approx


def bra_error(X: torch.Tensor, mask: torch.Tensor, order: int) -> float:
    err = 0.0
    for r in range(X.shape[0]):
        vals = [float(v) for v, m in zip(X[r], mask[r]) if m]
        err += sum((v - a) ** 2 for v, a in zip(vals, bra_row(vals, order)[3]))
    return err


def naive_salient_k(x: torch.Tensor, s: torch.Tensor, up_lim: int) -> int:
    """BiLLM's loop: k = 1 … U−1 top columns, R₂ on both sides, strict < keeps the first."""
    U = min(up_lim, x.shape[1])
    top = torch.topk(s.abs().sum(0), U).indices
    best, best_k = math.inf, None
    for k in range(1, U):
        m = torch.zeros_like(x, dtype=torch.bool)
        m[:, top[:k]] = True
        e = bra_error(x, m, 2) + bra_error(x, ~m, 2)
        if e < best:
            best, best_k = e, k
    return best_k


def naive_split(x: torch.Tensor, s: torch.Tensor, region: torch.Tensor, order: int = 1):
    """BiLLM's loop over numpy quantiles of |s ⊙ region|: returns (p, error)."""
    levels = torch.linspace(0.10, 0.90, 81).numpy()
    cands = np.quantile((s * region).abs().reshape(-1).numpy(), levels)
    best, best_p = math.inf, None
    for p in cands:
        small = region & (s.abs() < float(p))
        e = bra_error(x, small, order) + bra_error(x, region & ~small, order)
        if e < best:
            best, best_p = e, float(p)
    return best_p, best


# -- golden ----------------------------------------------------------------------------------
def test_bra_row_by_hand():
    # order 1 on [1, 2, 3, 6]: μ = 3, α = (2 + 1 + 0 + 3)/4 = 1.5, signs − − + +
    r = residual_binarize(torch.tensor([[1., 2, 3, 6]]), torch.ones(1, 4, dtype=torch.bool), 2)
    assert r.alpha[0, 0].item() == 1.5 and r.signs[0, 0].tolist() == [False, False, True, True]
    # residual [1 − 1.5, 2 − 1.5, 3 − 4.5, 6 − 4.5] = [−.5, .5, −1.5, 1.5]: μ₂ = 0, α₂ = 1
    assert r.alpha[1, 0].item() == 1.0 and r.mu[0].item() == 3.0
    assert r.signs[1, 0].tolist() == [False, True, False, True]
    assert r.approx.tolist() == [[0.5, 2.5, 3.5, 5.5]]


def test_golden_4x8_salient_columns_split_scales_means_signs():
    m = get_method("billm")
    loop = m.fit(W_GOLD, CTX_GOLD)  # the grid the loop uses: fp32 scales, as the reference
    c = m.store(loop)  # stored: rounded to fp16 once
    assert (loop.scale_dtype, c.scale_dtype) == ("float32", "float16")
    assert loop.mu[2, 0, 0].item() == torch.tensor(0.2).item() != fp16(0.2)
    assert torch.equal(c.signs, loop.signs) and torch.equal(c.group, loop.group)
    # column scores Σ W²: col 0 = 294, col 5 = 277, the rest ≤ 12. k = 2 makes both salient
    # columns exact (two values per row) and leaves only the {1, 9} mixture outside.
    assert c.salient_cols.tolist() == [True, False, False, False, False, True, False, False]
    # split: the ±3 weights (s = 9) form the sparse group (id 1), the ±1 the concentrated (2)
    want_group = torch.tensor([[0, 2, 2, 1, 2, 0, 2, 2],
                               [0, 2, 2, 2, 1, 0, 2, 2],
                               [0, 2, 1, 2, 2, 0, 2, 2],
                               [0, 2, 2, 2, 2, 0, 1, 1]], dtype=torch.uint8)
    assert torch.equal(c.group, want_group)
    assert c.orders == (2, 1, 1) and c.n_salient == 1
    # salient, row 0: [8, −10] → μ₁ = −1, α₁ = 9, exact; the second order is all zeros
    # row 3: [−7, 8] → μ = 0.5, α₁ = 7.5
    assert c.alpha[0, 0, :, 0].tolist() == [9.0, 8.0, 9.0, 7.5]
    assert c.alpha[0, 1, :, 0].tolist() == [0.0] * 4
    assert c.mu[0, :, 0].tolist() == [-1.0, -1.0, 1.0, 0.5]
    # sparse: row 0 [3] → μ = 3, α = 0; row 3 [3, −3] → μ = 0, α = 3
    assert c.mu[1, :, 0].tolist() == [3.0, -3.0, 3.0, 0.0]
    assert c.alpha[1, 0, :, 0].tolist() == [0.0, 0.0, 0.0, 3.0]
    # concentrated, row 0: [1, −1, 1, −1, 1] → μ = 0.2, α = (.8+1.2+.8+1.2+.8)/5 = 0.96
    # row 3: [−1, −1, 1, 1] → μ = 0, α = 1
    assert c.mu[2, :, 0].tolist() == [fp16(0.2), fp16(0.2), fp16(0.2), 0.0]
    assert c.alpha[2, 0, :, 0].tolist() == [fp16(0.96)] * 3 + [1.0]
    # signs: plane 0 = sign(w − μ) of each group (sign(0) = +1); plane 1 only in salient cols
    assert c.signs[0, 0].tolist() == [True, True, False, True, True, False, False, True]
    assert c.signs[1].any(0).tolist() == [True, False, False, False, False, True, False, False]
    hi, lo = fp16(0.2) + fp16(0.96), fp16(0.2) - fp16(0.96)
    assert torch.equal(c.dequantize()[0], torch.tensor([8., hi, lo, 3, hi, -10, lo, hi]))
    assert torch.equal(c.dequantize()[3], W_GOLD[3])


def test_golden_split_threshold_is_the_first_minimising_quantile():
    s = W_GOLD ** 2
    region = torch.ones(4, 8, dtype=torch.bool)
    region[:, [0, 5]] = False
    # |s ⊙ region| has 8 zeros, 19 ones and 5 nines; levels 0.84 … 0.90 lie between the ones
    # and the nines and all give the exact split: 0.84 is the first, p = 1 + 8·(0.84·31 − 26)
    p, err, improved = search_split(s, s, region, order=1)
    assert improved and err == pytest.approx(0.0, abs=1e-9)
    assert p.item() == pytest.approx(1 + 8 * (0.84 * 31 - 26), rel=1e-5)
    assert p.item() == pytest.approx(naive_split(s, s, region)[0], rel=1e-6)


def test_nearest_signs_round_new_weights_onto_the_golden_grid():
    c = get_method("billm").fit(W_GOLD, CTX_GOLD)
    # row 0: col 0 salient (μ = −1, α = (9, 0)): 7.5 → d = 8.5, levels −9, −9, 9, 9 → "+−";
    # col 1 concentrated (μ = 0.2, α = 0.96): 0.3 → +, 0.1 → −; col 3 sparse (μ = 3, α = 0)
    W = torch.tensor([[7.5, 0.3, 0.1, 2.0]])
    cols = [0, 1, 2, 3]
    sub = c.__class__(**{**c.__dict__, "group": c.group[:1, cols], "alpha": c.alpha[:, :, :1],
                         "mu": c.mu[:, :1], "signs": c.signs[:, :1, cols]})
    got = nearest_signs(W, sub, slice(0, 4))
    assert got[0].tolist() == [[True, True, False, True]]  # sparse: d·α = 0 ≥ 0 → +
    assert got[1].tolist() == [[False, False, False, False]]


def test_intra_block_option_uses_column_feedback_and_lowers_the_error():
    W, H = correlated(seed=2)

    def D(Q):
        return torch.einsum("rc,cd,rd->", W - Q, H, W - Q).item()

    block = reconstruct(W, H, get_method("billm"), block_size=32)
    m = get_method("billm", {"intra_block": True})
    assert m.feedback == "column" and get_method("billm").feedback == "block"
    col = reconstruct(W, H, m, block_size=32)
    assert torch.equal(col.codes.dequantize(), col.Q)
    assert D(col.Q) < D(block.Q)


# -- searches against naive loops -----------------------------------------------------------
@pytest.mark.parametrize("metric", ["hessian", "magnitude"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_search_is_the_argmin_of_its_candidates(metric, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 16, generator=g)
    s = W ** 2 if metric == "hessian" else W
    region = torch.rand(6, 16, generator=g) > 0.25
    p, err, _ = search_split(s, s, region, order=1)
    p_ref, err_ref = naive_split(s, s, region)
    assert p.item() == pytest.approx(p_ref, rel=1e-6)
    assert err == pytest.approx(err_ref, rel=1e-5)


def test_split_search_measured_on_weights_is_the_argmin_of_its_candidates():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, 16, generator=g)
    s = W ** 2 / torch.rand(16, generator=g).add(0.5) ** 2
    region = torch.rand(6, 16, generator=g) > 0.25
    p, err, _ = search_split(W, s, region, order=1)  # groups by |s|, error on W
    p_ref, err_ref = naive_split(W, s, region)
    assert p.item() == pytest.approx(p_ref, rel=1e-6)
    assert err == pytest.approx(err_ref, rel=1e-5)


@pytest.mark.parametrize("B,up_lim", [(16, 50), (16, 6), (60, 50)])
def test_salient_column_search_equals_the_naive_loop(B, up_lim):
    g = torch.Generator().manual_seed(B + up_lim)
    W = torch.randn(5, B, generator=g) * torch.rand(B, generator=g).add(0.2) * 3
    s = W ** 2
    cols, errs = salient_columns(s, s.sum(0), up_lim)
    k = naive_salient_k(s, s, up_lim)
    assert int(cols.sum()) == k
    top = torch.topk(s.sum(0), min(up_lim, B)).indices
    assert set(top[:k].tolist()) == set(torch.nonzero(cols).flatten().tolist())
    assert errs.numel() == min(up_lim, B) - 1


def test_quantiles_match_torch_quantile():
    v = torch.randn(1000).abs()
    levels = torch.linspace(0.1, 0.9, 81)
    assert torch.equal(quantiles(v), torch.quantile(v, levels))


def test_split_masks_partition_the_region():
    s = torch.tensor([[0.5, 2.0, 1.0, 3.0]])
    region = torch.tensor([[True, True, True, False]])
    large, small = split_masks(s, region, torch.tensor(1.0))
    assert large.tolist() == [[False, True, True, False]]  # |s| ≥ p goes to the sparse group
    assert small.tolist() == [[True, False, False, False]]


# -- saliency options -------------------------------------------------------------------------
def test_saliency_cholesky_and_inverse_diagonals():
    W, H = correlated(4, 12)
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(12)
    Hinv = torch.linalg.inv(Hd.double()).float()
    U = torch.linalg.cholesky(Hinv, upper=True)
    ctx = BlockContext(H=H[4:8, 4:8], U=U[4:8, 4:8], columns=slice(4, 8), state=inverse_diag(U))
    Wb = W[:, 4:8]
    torch.testing.assert_close(block_saliency(Wb, ctx, "hessian", "cholesky"),
                               Wb ** 2 / torch.diag(U)[4:8] ** 2)
    torch.testing.assert_close(block_saliency(Wb, ctx, "hessian", "inverse"),
                               Wb ** 2 / torch.diag(Hinv)[4:8] ** 2, rtol=1e-4, atol=0)
    assert block_saliency(Wb, ctx, "magnitude", "cholesky") is Wb


@pytest.mark.parametrize("overrides", [{}, {"salient_metric": "magnitude"},
                                       {"hessian_diag": "inverse"}, {"search_target": "weight"},
                                       {"up_lim": 5}, {"order_rest": 2}])
def test_options_run_and_codes_reproduce_Q(overrides):
    W, H = correlated()
    rec = reconstruct(W, H, get_method("billm", overrides), block_size=32)
    assert torch.equal(rec.codes.dequantize(), rec.Q)
    assert 1.0 <= rec.codes.paper_bits() <= 2.0


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(MethodArgumentError, match="up_lim"):
        get_method("billm", {"up_lim": 0})
    with pytest.raises(MethodArgumentError, match="order"):
        get_method("billm", {"order_salient": 3})
    with pytest.raises(MethodArgumentError, match="salient_metric"):
        get_method("billm", {"salient_metric": "random"})


# -- blocks, determinism, error ------------------------------------------------------------------
@pytest.mark.parametrize("B", [8, 64])
def test_block_narrower_than_up_lim(B):
    W, H = correlated(12, B, seed=B)
    rec = reconstruct(W, H, get_method("billm"), block_size=128)
    c = rec.codes
    assert torch.equal(c.dequantize(), rec.Q)
    assert 1 <= int(c.salient_cols.sum()) <= min(50, B) - 1
    assert (c.group == 0).sum() == 12 * int(c.salient_cols.sum())


def test_single_column_block_is_salient():
    W, H = correlated(6, 9)
    rec = reconstruct(W, H, get_method("billm"), block_size=8)  # last block: one column
    assert bool(rec.codes.salient_cols[8])
    assert torch.equal(rec.codes.dequantize(), rec.Q)


def test_seeded_runs_are_deterministic():
    W, H = correlated(seed=3)
    a = reconstruct(W, H, get_method("billm"), block_size=32)
    b = reconstruct(W, H, get_method("billm"), block_size=32)
    assert torch.equal(a.Q, b.Q) and torch.equal(a.codes.group, b.codes.group)


def test_billm_beats_sign_baseline_in_hessian_error():
    W, H = correlated(seed=4)

    def D(Q):
        return torch.einsum("rc,cd,rd->", W - Q, H, W - Q).item()

    billm = reconstruct(W, H, get_method("billm"), block_size=32).Q
    sign = reconstruct(W, H, get_method("rtn-sign"), block_size=32, feedback="none").Q
    assert D(billm) < D(sign)


# -- end to end ----------------------------------------------------------------------------------
def test_end_to_end_stories260k(stories_model, stories_tokenizer, shared):
    from binllm.engine.binarize import binarize_model
    from binllm.engine.config import QuantizeConfig
    from binllm.evaluation.data import calibration_batches, eval_tokens, load_text
    from binllm.evaluation.perplexity import perplexity

    calib = calibration_batches(load_text("tinystories", "train", shared / "data"),
                                stories_tokenizer, nsamples=4, seqlen=128, seed=0)
    tokens = eval_tokens(load_text("tinystories", "validation", shared / "data"),
                         stories_tokenizer, 256)
    report = binarize_model(stories_model, QuantizeConfig("billm"), calib)
    assert len(report.linears) == 5 * 7
    for name, codes in report.codes.items():
        assert torch.equal(codes.dequantize(), stories_model.get_submodule(name).weight.data)
    assert 1.0 < report.paper_bits < 2.0 and report.stored_bits > report.paper_bits
    assert math.isfinite(perplexity(stories_model, tokens, 256, max_windows=2).ppl)


@pytest.mark.parametrize("name", ["billm", "arb", "arb-x", "arb-rc"])
def test_split_on_weight_splits_the_non_salient_weights_by_magnitude(name):
    """split_on=weight (the paper, §3.4): sparse = the largest |W| of the non-salient weights;
    the reference default splits the Hessian-scaled |s| instead, which orders them otherwise."""
    from binllm.methods import get_method
    from binllm.engine.reconstruct import reconstruct

    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 64, generator=g)
    X = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 3.0, 64)  # uneven H diagonal
    H = 2 / 256 * X.T @ X

    def ordered_by_magnitude(codes) -> bool:
        a = W.abs()
        sparse, conc = codes.group == codes.n_salient, codes.group == codes.n_salient + 1
        return bool(a[conc].max() <= a[sparse].min())

    paper = reconstruct(W, H, get_method(name, {"split_on": "weight"}), feedback="none")
    reference = reconstruct(W, H, get_method(name, {}), feedback="none")
    assert ordered_by_magnitude(paper.codes)
    assert not ordered_by_magnitude(reference.codes)
    assert torch.equal(paper.codes.dequantize(), paper.Q)
