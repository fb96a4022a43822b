"""PB-LLM PTQ (Shang et al. 2023): golden example by hand, properties, end to end."""

from __future__ import annotations

import math

import pytest
import torch

from binllm.methods import METHODS, MethodArgumentError, get_method
from binllm.methods.codes import PartialBinaryCodes, to_storage
from binllm.methods.pbllm import binarization_stats, salient_mask, weight_saliency
from binllm.engine.reconstruct import reconstruct

# 2×8 golden matrix, every entry exact in fp16.
W_GOLD = torch.tensor([[0.5, -1.0, 4.0, 0.25, -0.5, 1.0, -0.25, 2.0],
                       [1.5, -0.75, 0.5, -3.0, 0.25, 0.75, -2.5, -0.5]])


def correlated(rows=24, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, 12, generator=g) @ torch.randn(12, cols, generator=g) \
        + 0.1 * torch.randn(1024, cols, generator=g)  # (tokens, cols), strongly correlated
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(rows, cols, generator=g)
    return W, H


def h_error(W, Q, H):
    D = W - Q
    return torch.einsum("rc,cd,rd->", D, H, D).item()


# -- golden --------------------------------------------------------------------------------
def test_golden_2x8_mask_alpha_mu_high_grid_and_Q():
    # salient_fraction 0.25 → low_frac 0.75 → k = ⌊16·0.75⌋ = 12; sorted |W| (0-based) has
    # 2.0 at rank 12, so the salient weights are |W| > 2: 4.0, −3.0, −2.5 (3 = 16 − 12 − 1).
    m = get_method("pbllm", {"salient_fraction": 0.25, "salient_metric": "magnitude"})
    rec = reconstruct(W_GOLD, None, m, block_size=8, feedback="none")
    c = rec.codes
    want_mask = torch.zeros(2, 8, dtype=torch.bool)
    want_mask[0, 2] = want_mask[1, 3] = want_mask[1, 6] = True
    assert torch.equal(c.salient, want_mask)
    # reference stats: M = W ⊙ ¬salient, all 8 columns averaged.
    # row 0: ΣM = 2.0 → μ = 0.25; Σ|M − μ| = .25+1.25+.25+0+.75+.75+.5+1.75 = 5.5 → α = 0.6875
    # row 1: ΣM = 1.75 → μ = 0.21875; Σ|M − μ| = 4.25 → α = 0.53125
    assert c.mu[:, 0].tolist() == [0.25, 0.21875]
    assert c.alpha[:, 0].tolist() == [0.6875, 0.53125]
    # 8-bit min–max over the full row: row 0 [−1, 4] → s = 5/255, z = round(1/s) = 51;
    # row 1 [−3, 1.5] → s = 4.5/255, z = round(3/s) = 170.
    s = to_storage(torch.tensor([5 / 255, 4.5 / 255]))
    assert torch.equal(c.high_scale, s)
    assert c.high_zero.tolist() == [51.0, 170.0]
    # salient levels: 4 → round(4/s0) + 51 = 255; −3 → 0; −2.5 → round(−2.5/s1) + 170 = 28
    assert (c.q_high[0, 2].item(), c.q_high[1, 3].item(), c.q_high[1, 6].item()) == (255, 0, 28)
    # binarized: α·sign(w − μ) + μ with sign(0) = +1 (row 0, column 3: w = μ = 0.25)
    hi, lo0 = 0.25 + 0.6875, 0.25 - 0.6875
    hi1, lo1 = 0.21875 + 0.53125, 0.21875 - 0.53125
    want = torch.tensor([[hi, lo0, 0, hi, lo0, hi, lo0, hi],
                         [hi1, lo1, hi1, 0, hi1, hi1, 0, lo1]])
    want[0, 2] = s[0] * (255 - 51)
    want[1, 3] = s[1] * (0 - 170)
    want[1, 6] = s[1] * (28 - 170)
    assert torch.equal(rec.Q, want)
    assert torch.equal(c.dequantize(), rec.Q)
    assert c.paper_bits() == pytest.approx(13 / 16 * 1 + 3 / 16 * 8)


def test_golden_masked_stats_use_non_salient_entries_only():
    # row 0 non-salient: [.5, −1, .25, −.5, 1, −.25, 2] → μ = 2/7, Σ|w − μ| = 37/7 → α = 37/49
    # row 1 non-salient: [1.5, −.75, .5, .25, .75, −.5] → μ = 7/24, Σ|w − μ| = 90/24 → α = 5/8
    m = get_method("pbllm", {"salient_fraction": 0.25, "salient_metric": "magnitude",
                             "stats": "masked"})
    c = reconstruct(W_GOLD, None, m, block_size=8, feedback="none").codes
    assert torch.equal(c.mu[:, 0], to_storage(torch.tensor([2 / 7, 7 / 24])))
    assert torch.equal(c.alpha[:, 0], to_storage(torch.tensor([37 / 49, 5 / 8])))


def test_ties_at_the_threshold_go_to_the_binarized_side():
    # k = ⌊16·0.5625⌋ = 9: rank 9 of sorted |W| is 1.0, which appears twice (ranks 9 and 10);
    # both stay binarized, so 5 weights are salient instead of 16 − 9 − 1 = 6.
    mask = salient_mask(W_GOLD.abs(), 0.5625)
    assert int(mask.sum()) == 5
    assert not mask[0, 1] and not mask[0, 5]  # the two |w| = 1.0
    assert torch.equal(mask, W_GOLD.abs() > 1.0)


def test_hessian_saliency_uses_cholesky_or_inverse_diagonal():
    W = torch.tensor([[1.0, 2.0]])
    U = torch.tensor([[2.0, 1.0], [0.0, 3.0]])  # H⁻¹ = UᵀU = [[4, 2], [2, 10]]
    assert torch.equal(weight_saliency(W, U, "hessian", "cholesky"), torch.tensor([[1 / 4, 4 / 9]]))
    assert torch.equal(weight_saliency(W, U, "hessian", "inverse"),
                       torch.tensor([[1 / 16, 4 / 100]]))
    assert torch.equal(weight_saliency(-W, None, "magnitude", "cholesky"), W)


# -- properties ----------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3])
@pytest.mark.parametrize("groupsize", [-1, 64])
def test_salient_fraction_honoured_per_group(fraction, groupsize):
    W, H = correlated(rows=32, cols=192)
    m = get_method("pbllm", {"salient_fraction": fraction, "groupsize": groupsize})
    c = reconstruct(W, H, m, block_size=64).codes
    gs = 192 if groupsize == -1 else groupsize
    for g0 in range(0, 192, gs):
        n = 32 * gs
        assert int(c.salient[:, g0:g0 + gs].sum()) == n - int(n * (1 - fraction) + 1e-9) - 1
    assert c.paper_bits() == pytest.approx(1 + 7 * fraction, abs=8 / (32 * 64))


def test_reference_stats_are_masked_stats_shrunk_by_the_zero_fill():
    """§2.2/§8.4: μ_ref = μ_masked · n_ns/c and α_ref = (Σ_ns|w − μ_ref| + n_s·|μ_ref|)/c."""
    W, _ = correlated(rows=16, cols=40, seed=3)
    W = W + 0.7  # a non-zero row mean makes the zero-fill bias visible
    sal = salient_mask(W.abs(), 0.8)
    a_ref, mu_ref = binarization_stats(W, sal, "reference")
    _, mu_msk = binarization_stats(W, sal, "masked")
    n_ns = (~sal).sum(1).float()
    assert torch.allclose(mu_ref, mu_msk * n_ns / 40, atol=2e-3)
    dev = ((W - mu_ref[:, None]).abs() * (~sal)).sum(1) + (40 - n_ns) * mu_ref.abs()
    assert torch.allclose(a_ref, dev / 40, atol=2e-3)
    assert (mu_ref.abs() < mu_msk.abs()).all()  # biased toward 0


def test_column_feedback_lowers_h_weighted_error_vs_none():
    W, H = correlated()
    errs = {}
    for fb in ("column", "none"):
        rec = reconstruct(W, H, get_method("pbllm-10"), block_size=32, feedback=fb)
        errs[fb] = h_error(W, rec.Q, H)
    assert errs["column"] < 0.5 * errs["none"]


@pytest.mark.parametrize("feedback", ["column", "block", "none"])
@pytest.mark.parametrize("args", [{}, {"groupsize": 48, "stats": "masked"},
                                  {"salient_metric": "magnitude", "high_bit": 4},
                                  {"hessian_diag": "inverse", "salient_fraction": 0.3}])
def test_codes_dequantize_equals_Q(feedback, args):
    W, H = correlated(rows=20, cols=100, seed=1)
    rec = reconstruct(W, H, get_method("pbllm", args), block_size=32, feedback=feedback)
    c = rec.codes
    assert isinstance(c, PartialBinaryCodes) and c.shape == (20, 100)
    assert torch.equal(c.dequantize(), rec.Q)
    assert not (c.signs & c.salient).any() and (c.q_high[~c.salient] == 0).all()
    assert int(c.q_high.max()) <= 2 ** c.high_bit - 1


def test_blocks_use_absolute_columns():
    """Without feedback, the block size cannot matter: the mask and stats are layer-wide."""
    W, H = correlated(rows=8, cols=70, seed=2)
    m = get_method("pbllm", {"groupsize": 30})
    one = reconstruct(W, H, m, block_size=70, feedback="none")
    many = reconstruct(W, H, m, block_size=16, feedback="none")
    assert torch.equal(one.Q, many.Q)


def test_presets_registered():
    for name, frac, bits in (("pbllm-10", 0.1, 1.7), ("pbllm-20", 0.2, 2.4),
                             ("pbllm-30", 0.3, 3.1)):
        spec = METHODS[name]
        assert spec.preset["salient_fraction"] == frac
        m = get_method(name)
        assert m.args.salient_metric == "hessian" and m.args.stats == "reference"
        assert m.args.high_bit == 8 and m.feedback == "column"
        assert 1 + 7 * frac == pytest.approx(bits)
    assert "pbllm" in METHODS


@pytest.mark.parametrize("args, words", [({"salient_fraction": 1.5}, "between 0 and 1"),
                                         ({"high_bit": 9}, "1 to 8 bits"),
                                         ({"groupsize": 0}, "positive number"),
                                         ({"stats": "mean"}, "reference, masked")])
def test_bad_arguments_say_what_to_change(args, words):
    with pytest.raises(MethodArgumentError, match=words):
        get_method("pbllm", {k: str(v) for k, v in args.items()})


def test_hessian_metric_without_calibration_is_a_clear_error():
    with pytest.raises(MethodArgumentError, match="salient_metric=magnitude"):
        reconstruct(W_GOLD, None, get_method("pbllm"), feedback="none")


# -- end to end ----------------------------------------------------------------------------
def test_end_to_end_stories260k(stories_model, stories_tokenizer, shared):
    from binllm.engine.binarize import binarize_model
    from binllm.engine.config import QuantizeConfig
    from binllm.evaluation.data import calibration_batches, eval_tokens, load_text
    from binllm.evaluation.perplexity import perplexity

    model = stories_model
    calib = calibration_batches(load_text("c4", "validation", shared / "data"),
                                stories_tokenizer, nsamples=4, seqlen=128, seed=0)
    tokens = eval_tokens(load_text("tinystories", "validation", shared / "data"),
                         stories_tokenizer, 256)
    fp = perplexity(model, tokens, 256, max_windows=4).ppl
    report = binarize_model(model, QuantizeConfig("pbllm-10"), calib)
    assert len(report.linears) == 5 * 7
    for name, codes in report.codes.items():
        linear = model.get_submodule(name)
        assert torch.equal(codes.dequantize(), linear.weight.data), name
    assert report.paper_bits == pytest.approx(1.7, abs=0.01)
    assert report.stored_bits > report.paper_bits
    q = perplexity(model, tokens, 256, max_windows=4).ppl
    assert math.isfinite(q) and q > fp
