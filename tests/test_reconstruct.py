"""The one reconstruction loop: H = I equals plain rounding, correlated inputs beat rounding,
codes reproduce Q exactly, both feedback modes run, dead columns and damping are handled."""

from __future__ import annotations

import pytest
import torch

from binllm.methods import get_method
from binllm.engine.reconstruct import reconstruct


def _W(rows=16, cols=64, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _fp16(x):
    return x.half().float()


def rtn_minmax(W, bits, in_loop=False):
    """Round-to-nearest on the asymmetric min–max grid of each row, worked out by hand.

    The levels come from the fp32 scale (the reference), which is stored in fp16 afterwards;
    in_loop: the fp16 scale is used for the levels too (scale_rounding=in_loop)."""
    maxq = 2 ** bits - 1
    xmin = torch.clamp(W.min(dim=1, keepdim=True).values, max=0)
    xmax = torch.clamp(W.max(dim=1, keepdim=True).values, min=0)
    scale = (xmax - xmin) / maxq
    if in_loop:
        scale = _fp16(scale)
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(W / scale) + zero, 0, maxq)
    return _fp16(scale) * (q - zero)  # scales are stored in fp16


def sign_by_hand(W, groupsize, rounded=True):
    """α·sign(W − μ) + μ per row and group of columns, α = mean|W − μ|, μ = mean W
    (α and μ rounded to fp16 unless not `rounded`)."""
    r = _fp16 if rounded else (lambda x: x)
    Q = torch.empty_like(W)
    for c in range(0, W.shape[1], groupsize):
        Wg = W[:, c:c + groupsize]
        mu = Wg.mean(dim=1, keepdim=True)
        alpha = (Wg - mu).abs().mean(dim=1, keepdim=True)
        S = torch.where(Wg >= mu, 1.0, -1.0)
        Q[:, c:c + groupsize] = r(alpha) * S + r(mu)
    return Q


def correlated_inputs(n=512, d=64, seed=0):
    """X = Z·M with a random mixing M: strongly correlated columns, like real activations."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g) / d ** 0.5 + 0.5 * torch.ones(d, d) / d ** 0.5
    return torch.randn(n, d, generator=g) @ M  # (n, d)


def H_of(X):
    return 2.0 / X.shape[0] * X.T @ X


def output_error(W, Q, X):
    return torch.linalg.norm((W - Q) @ X.T).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_with_identity_hessian_is_round_to_nearest(bits):
    W = _W()
    H = torch.eye(W.shape[1])
    gptq = get_method("gptq", {"bits": bits})
    column = reconstruct(W, H, gptq, feedback="column")
    none = reconstruct(W, H, gptq, feedback="none")
    assert torch.equal(column.Q, none.Q)
    torch.testing.assert_close(column.Q, rtn_minmax(W, bits), rtol=0, atol=1e-6)
    in_loop = reconstruct(W, H, get_method("gptq", {"bits": bits, "scale_rounding": "in_loop"}))
    torch.testing.assert_close(in_loop.Q, rtn_minmax(W, bits, in_loop=True), rtol=0, atol=1e-6)


def test_gptq_groups_with_identity_hessian_round_each_group_by_hand():
    W = _W(cols=128)
    rec = reconstruct(W, torch.eye(128), get_method("gptq", {"bits": 3, "groupsize": 32}),
                      block_size=64)
    expected = torch.cat([rtn_minmax(W[:, c:c + 32], 3) for c in range(0, 128, 32)], dim=1)
    torch.testing.assert_close(rec.Q, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("feedback", ["block", "none"])
def test_rtn_sign_with_identity_hessian_is_plain_binarization(feedback):
    W = _W()
    rec = reconstruct(W, torch.eye(64), get_method("rtn-sign", {"groupsize": 16}),
                      feedback=feedback)
    torch.testing.assert_close(rec.Q, sign_by_hand(W, 16), rtol=0, atol=1e-6)


def test_rtn_sign_without_hessian_binarizes_whole_rows():
    W = _W()
    rec = reconstruct(W, None, get_method("rtn-sign"))
    torch.testing.assert_close(rec.Q, sign_by_hand(W, 64), rtol=0, atol=1e-6)
    assert rec.percdamp is None
    assert rec.loss == pytest.approx(((W - rec.Q) ** 2).sum().item() / 2, rel=1e-5)


def test_loss_with_identity_hessian_is_damped_squared_error():
    # U = (1 + λ)^(-1/2) I with λ = 0.01 · mean diag I, so loss = (1 + λ) · Σ (w − q)² / 2
    W = _W()
    rec = reconstruct(W, torch.eye(64), get_method("gptq", {"bits": 3}))
    assert rec.percdamp == 0.01
    assert rec.loss == pytest.approx(1.01 * ((W - rec.Q) ** 2).sum().item() / 2, rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits):
    X = correlated_inputs()
    W = _W(rows=32)
    rec = reconstruct(W, H_of(X), get_method("gptq", {"bits": bits}), block_size=16)
    gptq_err = output_error(W, rec.Q, X)
    rtn_err = output_error(W, rtn_minmax(W, bits), X)
    assert gptq_err < 0.9 * rtn_err


def obs_oracle(W, H, quantize, percdamp=0.01):
    """GPTQ's column feedback as the OBS update it stands for, in float64, without Cholesky:
    quantize column j, spread (w_j − q_j)/[H⁻¹]_jj · [H⁻¹]_j,k over the columns k > j, then
    eliminate j from H⁻¹ (H⁻¹ ← H⁻¹ − H⁻¹_:j H⁻¹_j: / H⁻¹_jj)."""
    W, H = W.double().clone(), H.double()
    d = H.shape[0]
    Hinv = torch.linalg.inv(H + percdamp * torch.diag(H).mean() * torch.eye(d, dtype=H.dtype))
    Q = torch.zeros_like(W)
    for j in range(d):
        Q[:, j] = quantize(W[:, j].float(), j).double()
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q.float()


def test_gptq_column_feedback_equals_the_naive_obs_update():
    X = correlated_inputs(n=256, d=32)
    W = _W(rows=8, cols=32)
    H = H_of(X)
    bits, maxq = 3, 7
    xmin = torch.clamp(W.min(dim=1).values, max=0)
    xmax = torch.clamp(W.max(dim=1).values, min=0)
    scale = _fp16((xmax - xmin) / maxq)  # per-row grid fitted once on the original W
    zero = torch.round(-xmin / scale)

    def quantize(w, j):
        return scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)

    rec = reconstruct(W, H, get_method("gptq", {"bits": bits}), block_size=8)
    torch.testing.assert_close(rec.Q, obs_oracle(W, H, quantize), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale_rounding", ["after", "in_loop"])
def test_block_feedback_equals_a_column_by_column_oracle(scale_rounding):
    """Block mode: binarize a whole block, then push E = (W − Q)/U_jj onto later columns.

    "after" (default): the loop's Q and its feedback use fp32 α, μ; the stored Q rounds them
    to fp16 at the end. "in_loop": the feedback already sees the fp16-rounded Q."""
    from binllm.engine.hessian import inverse_cholesky

    X = correlated_inputs(n=256, d=48)
    W = _W(rows=8, cols=48)
    H = H_of(X)
    args = {"groupsize": 16, "scale_rounding": scale_rounding}
    rec = reconstruct(W, H, get_method("rtn-sign", args), feedback="block")
    U = inverse_cholesky(H).U.double()
    W2, Q = W.double().clone(), torch.zeros(8, 48, dtype=torch.float64)
    stored, loss = torch.zeros_like(Q), 0.0
    for i1 in range(0, 48, 16):
        blk = W2[:, i1:i1 + 16].float()
        Q[:, i1:i1 + 16] = sign_by_hand(blk, 16, rounded=scale_rounding == "in_loop").double()
        stored[:, i1:i1 + 16] = sign_by_hand(blk, 16).double()
        for j in range(i1, i1 + 16):
            err = (W2[:, j] - Q[:, j]) / U[j, j]
            loss += ((W2[:, j] - stored[:, j]) ** 2).sum().item() / U[j, j].item() ** 2 / 2
            for k in range(i1 + 16, 48):
                W2[:, k] -= err * U[j, k]
    torch.testing.assert_close(rec.Q, stored.float(), rtol=0, atol=1e-5)
    assert rec.loss == pytest.approx(loss, rel=1e-5)  # of the stored Q, on the loop's targets
    assert (rec.calibration_loss == rec.loss) == (scale_rounding == "in_loop")
    none = reconstruct(W, H, get_method("rtn-sign", {"groupsize": 16}), feedback="none")
    assert torch.equal(rec.Q[:, :16], none.Q[:, :16])  # the first block sees no feedback
    assert not torch.allclose(rec.Q[:, 16:], none.Q[:, 16:])


@pytest.mark.parametrize("method,args,feedback", [
    ("gptq", {"bits": 4}, "column"), ("gptq", {"bits": 2}, "block"),
    ("gptq", {"bits": 3, "groupsize": 16}, "column"),
    ("gptq", {"bits": 3, "groupsize": 16}, "none"),
    ("rtn-sign", {}, "none"), ("rtn-sign", {"groupsize": 16}, "block"),
])
def test_codes_dequantize_to_exactly_the_loops_Q(method, args, feedback):
    X = correlated_inputs(n=256, d=48)
    W = _W(rows=8, cols=48)
    rec = reconstruct(W, H_of(X), get_method(method, args), block_size=16, feedback=feedback)
    assert torch.equal(rec.codes.dequantize(), rec.Q)
    assert rec.Q.shape == W.shape and rec.Q.dtype == torch.float32


def test_dead_columns_are_zeroed():
    X = correlated_inputs(n=256, d=32)
    X[:, [3, 17]] = 0  # two inputs that never fire
    W = _W(rows=8, cols=32)
    rec = reconstruct(W, H_of(X), get_method("gptq", {"bits": 4}), block_size=8)
    assert (rec.Q[:, [3, 17]] == 0).all()
    assert torch.equal(rec.codes.dequantize(), rec.Q)


def test_indefinite_hessian_reports_the_damping_it_used():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    H = (Q @ torch.diag(torch.tensor([1.0] * 15 + [-0.05], dtype=torch.float64)) @ Q.T).float()
    rec = reconstruct(_W(rows=4, cols=16), H, get_method("gptq", {"bits": 4}))
    assert rec.percdamp == pytest.approx(0.1)


def test_input_weight_is_not_modified():
    W = _W()
    before = W.clone()
    reconstruct(W, H_of(correlated_inputs()), get_method("gptq", {"bits": 2}))
    assert torch.equal(W, before)


def test_feedback_without_hessian_is_refused():
    with pytest.raises(ValueError, match="Hessian"):
        reconstruct(_W(), None, get_method("gptq"), feedback="column")


def _with_dead_column(j=3, rows=8, cols=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[:, j] = 10.0  # the row maximum sits in the dead column
    X = torch.randn(4 * cols, cols, generator=g)
    X[:, j] = 0  # input j never fires
    return W, 2 / X.shape[0] * X.T @ X


@pytest.mark.parametrize("name,scale_of", [
    ("gptq", lambda c: c.scale[:, 0]), ("pbllm-10", lambda c: c.high_scale)])
def test_minmax_grids_are_fitted_before_dead_columns_are_zeroed(name, scale_of):
    """GPTQ and PB-LLM's references calibrate the min–max grid on W with its dead columns."""
    from binllm.methods.gptq import minmax_params

    W, H = _with_dead_column()
    bits = 4 if name == "gptq" else 8
    rec = reconstruct(W, H, get_method(name, {}))
    want, _ = minmax_params(W, bits)
    zeroed = W.clone()
    zeroed[:, 3] = 0
    without, _ = minmax_params(zeroed, bits)
    assert torch.allclose(scale_of(rec.codes), want, rtol=1e-3)
    assert not torch.allclose(scale_of(rec.codes), without, rtol=1e-3)


def test_block_gram_matrix_has_zero_diagonal_on_dead_columns():
    """ARB-X's S = H_blk/2 is the inputs' Gram matrix: a dead input has S_jj = 0, not 1/2."""
    from test_architectures import KeepWeights

    seen = []

    class Spy(KeepWeights):
        def fit(self, W, ctx):
            seen.append(ctx.H.clone())

    W, H = _with_dead_column()
    reconstruct(W, H, Spy(feedback="block"))
    assert seen[0][3, 3] == 0
    keep = torch.ones(32, dtype=torch.bool)
    keep[3] = False
    assert torch.equal(seen[0][keep][:, keep], H[keep][:, keep])
