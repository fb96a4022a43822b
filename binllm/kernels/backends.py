"""The kernel registry: which kernel computes a packed layer's product, chosen in order.

Two registries of `KernelBackend` entries (name, `applies(target, x)`, `matmul(target, x)`),
each tried in registration order, the first whose `applies` is true computing y:

- `LAYER_KERNELS`: kernels that read a BinaryLinear's packed buffers themselves (target = the
  layer; `matmul` returns y = layer(x), bias included). A layer whose packed buffers were
  released reads them back before such a kernel runs.
- `FORM_KERNELS`: kernels of the kernel form (`binllm.kernels.form`; target = the form;
  `matmul` returns y = x Ŵᵀ (N, rows) fp32 for x (N, cols); the CPU kernels return bf16 for
  a bf16 prefill, F.linear's own rounding). The last entry applies to every input, so there
  always is one. An entry may also have a `decoder(form)`: the form's forward with this
  kernel's decisions made once (`form_decoder`). A layer binds it at its first call and tries
  it first at every later one: at decode a product is so small that the dispatch around it
  costs as much as the kernel (`binllm.kernels.cpu.bind_decoder`). `decoder(x, bias)` returns
  `binllm.kernels.form_linear(form, x, bias.to(x.dtype))` bit for bit for the inputs it
  computes and None for the others, which go through the registry; it computes only inputs
  on its entry's device, so the entries' `applies` decide by the device (and target) alone.

Adding a backend is one entry in one of the tuples. Heavy modules (Triton, the compiled CPU
extension) are imported when their kernel first runs, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .form_ref import form_matmul_torch
from .gpu import sign_kernel_applies, sign_kernel_forward, triton_available


DecoderFn = Callable[[Tensor, Tensor | None], Tensor | None]  # decoder(x, bias) -> y or None


@dataclass(frozen=True)
class KernelBackend:
    """One kernel: `applies(target, x)` says whether it computes this product; `decoder`
    (FORM_KERNELS only, optional) binds a form's decode forward (module docstring)."""

    name: str
    applies: Callable[[Any, Tensor], bool]
    matmul: Callable[[Any, Tensor], Tensor]
    decoder: Callable[[Any], DecoderFn | None] | None = None


def _cpu_matmul(form, x: Tensor) -> Tensor:
    from . import cpu  # compiled on first use; falls back to PyTorch itself where it cannot

    return cpu.form_matmul(form, x)


def _cpu_decoder(form) -> DecoderFn | None:
    from . import cpu

    return cpu.decoder(form)


def _triton_matmul(form, x: Tensor) -> Tensor:
    from .triton_form import form_matmul

    return form_matmul(form, x)


LAYER_KERNELS: tuple[KernelBackend, ...] = (
    KernelBackend("triton-sign", lambda layer, x: x.is_cuda and sign_kernel_applies(layer),
                  sign_kernel_forward),
)

FORM_KERNELS: tuple[KernelBackend, ...] = (
    KernelBackend("cpu", lambda form, x: x.device.type == "cpu", _cpu_matmul, _cpu_decoder),
    KernelBackend("triton", lambda form, x: x.is_cuda and triton_available(), _triton_matmul),
    KernelBackend("torch", lambda form, x: True, form_matmul_torch),
)


def layer_kernel(layer, x: Tensor) -> KernelBackend | None:
    """The first LAYER_KERNELS entry that computes layer(x), or None (the form's kernels)."""
    return next((k for k in LAYER_KERNELS if k.applies(layer, x)), None)


def form_kernel(form, x: Tensor) -> KernelBackend:
    """The first FORM_KERNELS entry that computes the form's product with x."""
    return next(k for k in FORM_KERNELS if k.applies(form, x))


def declines(x: Tensor, bias: Tensor | None) -> None:
    """The decoder of a form whose kernel has none: every input goes to the registry."""
    return None


def form_decoder(form, x: Tensor) -> DecoderFn:
    """The decoder of the FORM_KERNELS entry that computes the form's product with x (bound
    once, for x's device), or `declines` where that entry has none."""
    kernel = form_kernel(form, x)
    bound = None if kernel.decoder is None else kernel.decoder(form)
    return declines if bound is None else bound
