"""Fast forward paths of packed layers: compute y = Ŵx from the packed bits.

Every kernel here is a pure function of a layer's packed codes and its input, tested against
the plain path `codes.dequantize() @ x`. May import `binllm.methods` (codes types) and
`binllm.packed.packing` (bit primitives); `binllm.packed.layers` dispatches to it. Which kernel
computes a kernel form is a registry (`binllm.kernels.backends`): adding a kernel of the form
is one entry there. At decode a layer calls the `form_decoder` it bound at its first call: the
chosen kernel's forward with the dispatch below decided once. Outside the registry,
`uniform8_linear` and `uniform8_linear_bf16` (8-bit UniformCodes read in place: a q8 table as
the output layer) are called directly by `binllm.packed.embedding`'s TiedHead; they are CPU
kernels only, with no CUDA or Triton counterpart (elsewhere they return None and the head takes
the kernel form's path). `int8_linear` is the int8 prefill (`binllm.kernels.cpu_int8`): an
approximate prompt product in 8-bit integer arithmetic that a layer takes only when asked.
`rms_norm` and `decode_attention` (`binllm.kernels.decode_ops`) are the lean decode loop's
fused glue: RMSNorm, and rotary embedding, cache write and attention of one token, each one
compiled CPU call (None where it does not apply: the caller's torch ops run),
`decode_layers` all of a token's decoder layers in one call, and `dense_gemv` a dense bf16
weight's product with the token.
`binllm.kernels.cpu_features` says what the CPU is (its flag line, whether it multiplies bf16
in hardware), standard library only, so the CLI can ask without loading the kernels;
`binllm.kernels.cpu_build` builds and loads the compiled extension (`extension()`).
"""

from __future__ import annotations

from torch import Tensor

from .backends import (FORM_KERNELS, LAYER_KERNELS, DecoderFn, KernelBackend, form_decoder,
                       form_kernel, layer_kernel)
from .decode_ops import decode_attention, decode_layers, dense_gemv, rms_norm
from .form import KernelForm, form_matmul_torch, kernel_form


def form_matmul(form: KernelForm, x: Tensor) -> Tensor:
    """y = x Ŵᵀ (N, rows) fp32 (bf16 from the CPU's bf16 prefill path) for x (N, cols) by the
    first kernel of `binllm.kernels.backends.FORM_KERNELS` that applies: the compiled CPU
    kernels for CPU tensors (`binllm.kernels.cpu`), the Triton kernel for CUDA tensors where
    Triton is installed (`binllm.kernels.triton_form`), the pure-PyTorch form elsewhere."""
    return form_kernel(form, x).matmul(form, x)


def uniform8_linear(q: Tensor, scale: Tensor, zero: Tensor, groupsize: int,
                    x: Tensor) -> Tensor | None:
    """F.linear(x, Ŵ) for 8-bit UniformCodes read in place from their packed tensors (q, scale,
    zero) by the compiled CPU kernel, or None where it does not compute x
    (`binllm.kernels.cpu.uniform8_linear`)."""
    from . import cpu  # compiled on first use

    return cpu.uniform8_linear(q, scale, zero, groupsize, x)


def uniform8_linear_bf16(q: Tensor, scale: Tensor, zero: Tensor, groupsize: int,
                         x: Tensor) -> Tensor | None:
    """F.linear(x, Ŵ.to(torch.bfloat16)) for a bf16 prompt x and 8-bit UniformCodes read in
    place (rows rebuilt in bf16, bf16 GEMM), or None where the compiled kernels do not compute
    x (`binllm.kernels.cpu.uniform8_linear_bf16`)."""
    from . import cpu  # compiled on first use

    return cpu.uniform8_linear_bf16(q, scale, zero, groupsize, x)


def int8_linear(form: KernelForm, x: Tensor, bias: Tensor | None = None) -> Tensor | None:
    """F.linear(x, Ŵ, bias) approximated in int8 arithmetic for a prompt on the CPU (the
    int8 prefill, an option: `binllm.kernels.cpu_int8`), or None where it does not apply."""
    from . import cpu_int8  # compiled kernels on first use

    return cpu_int8.int8_linear(form, x, bias)


def form_linear(form: KernelForm, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, Ŵ, bias) for x (..., cols) of any float dtype, computed from the form."""
    y = form_matmul(form, x.reshape(-1, form.cols)).to(x.dtype)
    y = y.reshape(*x.shape[:-1], form.rows)
    return y if bias is None else y + bias


__all__ = ["KernelForm", "kernel_form", "form_matmul", "form_linear", "form_matmul_torch",
           "KernelBackend", "FORM_KERNELS", "LAYER_KERNELS", "form_kernel", "layer_kernel",
           "DecoderFn", "form_decoder", "int8_linear", "uniform8_linear",
           "uniform8_linear_bf16", "rms_norm", "decode_attention", "decode_layers", "dense_gemv"]
