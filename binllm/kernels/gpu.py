"""The GPU kernel that reads a BinaryLinear's packed buffers: Triton's sign-plane kernel.

The Triton sign-plane kernel (`triton_sign`) reads one-sign-plane layers (rtn-sign, q1_0,
block-sign) straight from their packed buffers, when Triton is installed and the layer computes
with kernels (`kernels=True`, not `cache_dequantized`); it is the "triton-sign" entry of
`binllm.kernels.backends.LAYER_KERNELS`. Every other layer goes through its kernel form
(`binllm.kernels.form_matmul`, whose CUDA kernel is `triton_form`).
"""

from __future__ import annotations

import functools
import importlib.util

from torch import Tensor


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (looked up once per process)."""
    return importlib.util.find_spec("triton") is not None


def sign_kernel_applies(layer) -> bool:
    """Whether the sign-plane kernel computes this layer (on a CUDA input)."""
    if not getattr(layer, "kernels", True) or layer.cache_dequantized or not triton_available():
        return False
    from . import triton_sign

    return triton_sign.supports(layer.layout)


def sign_kernel_forward(layer, x: Tensor) -> Tensor:
    """y = layer(x) from the layer's packed sign bytes (the sign-plane kernel applies)."""
    from . import triton_sign

    return triton_sign.sign_linear(x, layer.layout, layer.packed(), layer.bias)


def gpu_forward(layer, x: Tensor, *, require_cuda: bool = True) -> Tensor | None:
    """y = layer(x) by a packed-bits kernel, or None when none applies to this layer and input.

    require_cuda=False lets the tests run the same call on the CPU under TRITON_INTERPRET=1.
    """
    if (require_cuda and not x.is_cuda) or not sign_kernel_applies(layer):
        return None
    return sign_kernel_forward(layer, x)
