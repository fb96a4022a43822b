"""The Triton kernel of the general kernel form (TRITON_INTERPRET=1) against codes.dequantize()."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated: run them in numpy
pytest.importorskip("triton")

from packed_codes import HAND_BUILT  # noqa: E402

from binllm.kernels.form import kernel_form  # noqa: E402


@pytest.fixture(scope="module")
def tf():
    import binllm.kernels.triton_form as mod

    if type(mod.bitpart_kernel).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)
    return mod


# every hand-built codes shape (BiLLM, CGB, ARB-RC with β, all-salient, GPTQ, PB-LLM, …)
@pytest.mark.parametrize("kind", list(HAND_BUILT))
@pytest.mark.parametrize("batch", [1, 17])  # decode GEMV, small-batch GEMM
def test_form_kernel_equals_the_dequantized_product(tf, kind, batch):
    codes = HAND_BUILT[kind]()
    rows, cols = codes.shape
    W = codes.dequantize()
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(2))
    got = tf.form_matmul(kernel_form(codes), x) + bias
    ref = x @ W.T + bias
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()), kind
