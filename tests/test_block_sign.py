"""block-sign / q1_0: llama.cpp's Q1_0 layout fitted by the reconstruction loop, with ARB α."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from binllm.methods import get_method
from binllm.methods.block_sign import fit_scales, sign_pass
from binllm.methods.codes import to_storage
from binllm.packed.layout import pack, unpack
from binllm.engine.reconstruct import reconstruct


def hessian(cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, cols, generator=g) @ (torch.eye(cols) + 0.4 * torch.randn(
        cols, cols, generator=g) / cols ** 0.5)
    return 2 * X.T @ X / 512


def weights(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def q1_0_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's quantize_row_q1_0_ref, row by row: d = fp16(Σ|x| / 128), bit = x ≥ 0."""
    d = np.zeros((x.shape[0], x.shape[1] // 128), dtype=np.float16)
    bits = np.zeros(x.shape, dtype=bool)
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // 128):
            blk = x[r, 128 * b:128 * (b + 1)]
            s = np.float32(0)
            for v in blk:
                s = np.float32(s + np.float32(abs(v)))
            d[r, b] = np.float16(s / np.float32(128))
            bits[r, 128 * b:128 * (b + 1)] = blk >= 0
    return d, bits


def test_q1_0_without_feedback_is_llama_cpp_reference_quantizer():
    g = torch.Generator().manual_seed(3)
    W = torch.randint(-64, 65, (3, 256), generator=g).float() / 64  # sums exact in fp32
    W[0, 5] = 0.0  # sign(0) = +1 as in llama.cpp (x >= 0)
    codes = reconstruct(W, None, get_method("q1_0"), feedback="none").codes
    d, bits = q1_0_reference(W.numpy())
    assert codes.block_size == 128 and codes.mu is None and codes.beta is None
    assert np.array_equal(codes.alpha[0, 0].numpy().astype(np.float16), d)
    assert np.array_equal(codes.signs[0].numpy(), bits)
    assert codes.stored_bits() == 3 * 256 + 3 * 2 * 16  # 1.125 bits per weight


def gptq_with_fixed_q1_0_grid(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Naive oracle: per 128-column block α = fp16(mean |W̃|) at block start, then GPTQ column by
    column onto ±α, errors fed forward through the whole remaining layer."""
    from binllm.engine.hessian import inverse_cholesky

    U = inverse_cholesky(H, 0.01).U
    W = W.clone()
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        if j % 128 == 0:
            alpha = to_storage(W[:, j:j + 128].abs().mean(1))
        q = torch.where(W[:, j] >= 0, alpha, -alpha)
        Q[:, j] = q
        W[:, j:] -= ((W[:, j] - q) / U[j, j])[:, None] * U[j, j:][None, :]
    return Q


def test_q1_0_without_refinement_is_gptq_on_the_q1_0_grid():
    W, H = weights(6, 256), hessian(256)
    r = reconstruct(W, H, get_method("q1_0", {"refine_iters": 0}))
    assert torch.allclose(r.Q, gptq_with_fixed_q1_0_grid(W, H), atol=1e-6, rtol=0)


def test_refinement_never_loses_and_helps_on_correlated_inputs():
    W, H = weights(32, 128), hessian(128)  # one block: loop loss = the α-step's objective / 2
    plain = reconstruct(W, H, get_method("q1_0", {"refine_iters": 0}))
    refined = reconstruct(W, H, get_method("q1_0", {"refine_iters": 4}))
    assert refined.loss <= plain.loss
    assert refined.loss < plain.loss * 0.9999  # the α-step changed something


def test_least_squares_step_matches_lstsq():
    g = torch.Generator().manual_seed(5)
    X, V = torch.randn(4, 20, generator=g), torch.randn(4, 20, generator=g)
    one = torch.randn(1, 20, generator=g)
    mu, alpha, ok = fit_scales(X, one, V, mean=True)
    for r in range(4):
        A = torch.stack([one[0], V[r]], 1).double()  # (20, 2)
        sol = torch.linalg.lstsq(A, X[r].double()[:, None]).solution[:, 0]
        assert ok[r] and torch.allclose(torch.stack([mu[r], alpha[r]]).double(), sol, atol=1e-5)
    _, alpha0, _ = fit_scales(X, one, V, mean=False)
    assert torch.allclose(alpha0, (X * V).sum(1) / (V * V).sum(1))


def test_sign_pass_without_hessian_is_the_nearest_level():
    W = weights(5, 16)
    mu, alpha, beta = torch.full((5,), 0.01), torch.full((5,), 0.04), torch.ones(16)
    assert torch.equal(sign_pass(W, None, mu, alpha, beta), W >= 0.01)


@pytest.mark.parametrize("args", [{}, {"mean": False}, {"column_scales": True},
                                  {"mean": False, "column_scales": True}, {"block": 48},
                                  {"refine_iters": 0, "scale_dtype": "float32"}])
@pytest.mark.parametrize("feedback", [None, "none", "block"])
def test_codes_dequantize_to_the_loop_weights_and_pack_exactly(args, feedback):
    W, H = weights(7, 200), hessian(200)  # a partial last block, rows not a multiple of 8
    r = reconstruct(W, H, get_method("block-sign", args), feedback=feedback)
    assert torch.equal(r.codes.dequantize(), r.Q)
    layout, tensors = pack(r.codes)
    assert torch.equal(unpack(layout, tensors).dequantize(), r.Q)
    assert layout.stored_bits() == r.codes.stored_bits()


def test_gptq_feedback_beats_no_feedback_in_output_error():
    W, H = weights(64, 256), hessian(256)

    def err(Q):
        E = W - Q
        return torch.trace(E @ H @ E.T).item()

    with_fb = reconstruct(W, H, get_method("q1_0")).Q
    without = reconstruct(W, H, get_method("q1_0"), feedback="none").Q
    assert err(with_fb) < err(without)


def test_bad_arguments_are_refused():
    from binllm.methods import MethodArgumentError

    with pytest.raises(MethodArgumentError, match="block=0"):
        get_method("q1_0", {"block": "0"})
    with pytest.raises(MethodArgumentError, match="refine_iters"):
        get_method("block-sign", {"refine_iters": "-1"})
