"""Which GPU kernel a BinaryLinear's forward uses on a CUDA tensor (None: the dense path).

The Triton sign-plane kernel (`triton_sign`) reads one-sign-plane layers (rtn-sign, q1_0,
block-sign) straight from their packed buffers, when Triton is installed and the layer computes
with kernels (`kernels=True`, not `cache_dequantized`). Every other layer goes through its kernel
form (`binllm.kernels.form_matmul`, whose CUDA path is `triton_form`).
"""

from __future__ import annotations

import functools
import importlib.util

from torch import Tensor


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (looked up once per process)."""
    return importlib.util.find_spec("triton") is not None


def gpu_forward(layer, x: Tensor, *, require_cuda: bool = True) -> Tensor | None:
    """y = layer(x) by a packed-bits kernel, or None when none applies to this layer and input.

    require_cuda=False lets the tests run the same call on the CPU under TRITON_INTERPRET=1.
    """
    if (require_cuda and not x.is_cuda) or not getattr(layer, "kernels", True) \
            or layer.cache_dequantized or not triton_available():
        return None
    from . import triton_sign

    if not triton_sign.supports(layer.layout):
        return None
    return triton_sign.sign_linear(x, layer.layout, layer.packed(), layer.bias)
