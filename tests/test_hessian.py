"""HessianAccumulator against the naive 2/N Σ XᵀX oracle; inverse_cholesky's contract."""

from __future__ import annotations

import logging

import pytest
import torch

from binllm.engine.hessian import HessianAccumulator, HessianNotPositiveDefinite, inverse_cholesky


def naive_H(samples: list[torch.Tensor]) -> torch.Tensor:
    """2/N Σ_n X_nᵀ X_n in float64, one (tokens, d) matrix per sample."""
    d = samples[0].shape[-1]
    H = torch.zeros(d, d, dtype=torch.float64)
    for X in samples:
        X = X.double()
        for t in range(X.shape[0]):  # one outer product per token: the definition, unvectorised
            H += torch.outer(X[t], X[t])
    return 2.0 / len(samples) * H


def _samples(n=6, tokens=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, d, generator=g) for _ in range(n)]


def test_accumulator_matches_naive_oracle_on_batched_inputs():
    samples = _samples()
    acc = HessianAccumulator(8)
    acc.add_batch(torch.stack(samples[:4]))  # (4, tokens, d): four samples
    acc.add_batch(torch.stack(samples[4:]))  # (2, tokens, d)
    assert acc.nsamples == 6
    torch.testing.assert_close(acc.H.double(), naive_H(samples), rtol=1e-5, atol=1e-5)


def test_accumulator_chunked_equals_one_shot():
    samples = _samples(n=8)
    one = HessianAccumulator(8)
    one.add_batch(torch.stack(samples))
    chunked = HessianAccumulator(8)
    for X in samples:
        chunked.add_batch(X[None])  # (1, tokens, d) per call, as the references feed it
    assert one.nsamples == chunked.nsamples == 8
    torch.testing.assert_close(chunked.H, one.H, rtol=1e-5, atol=1e-6)


def test_accumulator_counts_a_2d_input_as_one_sample_and_sums_in_fp32():
    X = _samples(n=1)[0]
    acc = HessianAccumulator(8)
    acc.add_batch(X.half())  # (tokens, d) in fp16
    assert acc.nsamples == 1
    assert acc.H.dtype == torch.float32
    torch.testing.assert_close(acc.H.double(), naive_H([X.half().float()]), rtol=1e-5, atol=1e-5)


def test_accumulator_without_samples_says_so():
    with pytest.raises(ValueError, match="calibration"):
        HessianAccumulator(4).H


def _spd(d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * d, d, generator=g)
    return X.T @ X / d


def test_inverse_cholesky_factor_inverts_the_damped_hessian():
    H = _spd()
    inv = inverse_cholesky(H, percdamp=0.01)
    lam = 0.01 * torch.diag(H).mean()
    expected = torch.linalg.inv((H + lam * torch.eye(6)).double())
    U = inv.U.double()
    assert torch.equal(U, torch.triu(U))  # upper triangular
    torch.testing.assert_close(U.T @ U, expected, rtol=1e-4, atol=1e-5)
    assert inv.percdamp == 0.01
    assert not inv.dead.any()


def test_dead_columns_get_unit_diagonal_and_are_reported():
    H = _spd()
    H[2, :] = 0
    H[:, 2] = 0
    inv = inverse_cholesky(H)
    assert inv.dead.tolist() == [False, False, True, False, False, False]
    assert inv.H[2, 2] == 1 and (inv.H[2, torch.arange(6) != 2] == 0).all()
    lam = 0.01 * torch.diag(inv.H).mean()  # damping is computed after the fix
    expected = torch.linalg.inv((inv.H + lam * torch.eye(6)).double())
    torch.testing.assert_close(inv.U.double().T @ inv.U.double(), expected, rtol=1e-4, atol=1e-5)


def _with_eigenvalues(values, seed=0):
    """Q diag(values) Qᵀ for a random orthogonal Q: no zero diagonal, chosen spectrum."""
    d = len(values)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (Q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ Q.T).float()


def test_rank_deficient_psd_hessian_needs_only_the_default_damping():
    H = _with_eigenvalues([3.0, 2.0, 1.0, 0.0, 0.0, 0.0])  # singular but PSD
    assert torch.linalg.matrix_rank(H) == 3
    assert inverse_cholesky(H, percdamp=0.01).percdamp == 0.01


def test_slightly_indefinite_hessian_recovers_with_more_damping(caplog):
    # mean diag = 2.95/4 ≈ 0.74: percdamp 0.01 adds 0.0074 < 0.05 (fails), 0.1 adds 0.074 (works)
    H = _with_eigenvalues([1.0, 1.0, 1.0, -0.05])
    assert torch.linalg.cholesky_ex(H + 0.01 * torch.diag(H).mean() * torch.eye(4)).info > 0
    with caplog.at_level(logging.WARNING, logger="binllm.engine.hessian"):
        inv = inverse_cholesky(H, percdamp=0.01, name="layers.3.mlp.up_proj")
    assert inv.percdamp == pytest.approx(0.1)
    assert "layers.3.mlp.up_proj" in caplog.text and "retrying" in caplog.text
    lam = inv.percdamp * torch.diag(H).mean()
    expected = torch.linalg.inv((H + lam * torch.eye(4)).double())
    torch.testing.assert_close(inv.U.double().T @ inv.U.double(), expected, rtol=1e-3, atol=1e-4)


def test_hopeless_hessian_raises_with_advice():
    H = -torch.eye(4)  # negative diagonal: damping only makes it worse
    with pytest.raises(HessianNotPositiveDefinite, match="nsamples=|percdamp=") as err:
        inverse_cholesky(H, percdamp=0.01, retries=2, name="layers.0.self_attn.q_proj")
    assert "layers.0.self_attn.q_proj" in str(err.value)
    assert "percdamp=1" in str(err.value)  # 0.01 → 0.1 → 1 after two retries
