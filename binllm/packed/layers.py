"""BinaryLinear: a linear layer computed from its packed codes.

The packed tensors of `binllm.packed.packing` are the module's buffers, so `state_dict()` keys are
the on-disk keys and `.to(device)` moves them. Three forwards, chosen per layer:

- kernels (the default): the codes' kernel form (`binllm.kernels.form`, bit planes and
  coefficients, derived once from the buffers on the first forward) and the fast kernels of
  `binllm.kernels` compute y = x Ŵᵀ + b from the bits; no dequantized weight is kept, and y
  equals the reference to fp32 round-off.
- reference (`kernels=False`): W = unpack(layout, buffers).dequantize(), the codes' own
  dequantize() as in calibration, then F.linear(x, W.to(x.dtype), bias), at every call: bit for
  bit the calibrated fake-quantized model.
- `cache_dequantized`: the reference weight is kept after the first forward (memory of an fp
  weight, speed of nn.Linear) until the buffers change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import form_linear
from ..kernels.form import KernelForm, kernel_form
from .layout import PackedLayout, pack, unpack
from .packing import PackingError


class BinaryLinear(nn.Module):
    """y = x Ŵᵀ + b with Ŵ dequantized from packed buffers (see `binllm.packed.formats`)."""

    def __init__(self, layout: PackedLayout, bias: bool = False, *,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype | None = None,
                 cache_dequantized: bool = False, kernels: bool = True):
        super().__init__()
        self.layout = layout
        self.in_features, self.out_features = layout.in_features, layout.out_features
        for name, spec in layout.specs().items():
            self.register_buffer(name, torch.empty(spec.shape, dtype=spec.dtype, device=device))
        if bias:
            bias_init = torch.zeros(self.out_features, dtype=bias_dtype, device=device)
            self.bias = nn.Parameter(bias_init, requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.cache_dequantized = cache_dequantized
        self.kernels = kernels
        self._cached: Tensor | None = None
        self._form: KernelForm | None = None

    @classmethod
    def from_codes(cls, codes: Any, bias: Tensor | None = None, **kwargs) -> BinaryLinear:
        """A BinaryLinear holding `codes` packed (bias copied as is)."""
        layout, tensors = pack(codes)
        device = next(iter(tensors.values())).device
        module = cls(layout, bias is not None, device=device,
                     bias_dtype=None if bias is None else bias.dtype, **kwargs)
        for name, t in tensors.items():
            getattr(module, name).copy_(t)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def packed(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.layout.specs()}

    def codes(self) -> Any:
        """The layer's codes, unpacked from the buffers (vectorised)."""
        return unpack(self.layout, self.packed())

    def dequantize(self) -> Tensor:
        """Ŵ (out_features, in_features) fp32: exactly the weights calibration produced."""
        return self.codes().dequantize()

    def stored_bits(self) -> int:
        """Bits of the packed buffers (bias excluded), as stored on disk."""
        return sum(t.numel() * t.element_size() * 8 for t in self.packed().values())

    def weight_for(self, dtype: torch.dtype) -> Tensor:
        if not self.cache_dequantized:
            return self.dequantize().to(dtype)
        if self._cached is None or self._cached.dtype != dtype \
                or self._cached.device != self.layout_device():
            self._cached = self.dequantize().to(dtype)
        return self._cached

    def layout_device(self) -> torch.device:
        return next(iter(self.packed().values())).device

    def clear_cache(self) -> None:
        self._cached = None
        self._form = None

    def kernel_form(self) -> KernelForm:
        """The codes' kernel form, derived from the buffers once (dropped when they change)."""
        if self._form is None:
            self._form = kernel_form(self.codes())
        return self._form

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda:  # packed-bits GPU kernel where one applies (binllm.kernels.gpu)
            from ..kernels.gpu import gpu_forward

            y = gpu_forward(self, x)
            if y is not None:
                return y
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kernels and not self.cache_dequantized:
            return form_linear(self.kernel_form(), x, bias)
        return F.linear(x, self.weight_for(x.dtype), bias)

    def _apply(self, fn, recurse: bool = True):
        """Packed buffers follow device moves but keep their dtype (fp16 or fp32 scales stay so
        under model.half() / .to(torch.bfloat16), so the codes never change)."""
        self.clear_cache()
        packed = {name: self._buffers.pop(name) for name in self.layout.specs()}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in packed.items():
                device = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device
                self._buffers[name] = buf.to(device)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        n = self.in_features * self.out_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.layout.format}, "
                f"bits/weight={self.layout.stored_bits() / n:.3f}, "
                f"kernels={self.kernels}, cache_dequantized={self.cache_dequantized}")


def replace_linears(model: nn.Module, layouts: Mapping[str, PackedLayout], *,
                    device: torch.device | str | None = None) -> dict[str, BinaryLinear]:
    """Swap the nn.Linear named in `layouts` for empty BinaryLinears (buffers on `device`)."""
    swapped = {}
    for name, layout in layouts.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError:
            raise PackingError(f"config.json lists the binarized linear {name!r}, which this "
                               f"{type(model).__name__} does not have") from None
        if isinstance(old, BinaryLinear):
            continue
        if not isinstance(old, nn.Linear):
            raise PackingError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        if (old.out_features, old.in_features) != (layout.out_features, layout.in_features):
            raise PackingError(f"{name}: the model has shape "
                               f"({old.out_features}, {old.in_features}), "
                               f"config.json stores ({layout.out_features}, {layout.in_features})")
        bias_dtype = None if old.bias is None else old.bias.dtype
        new = BinaryLinear(layout, old.bias is not None, device=device, bias_dtype=bias_dtype)
        setattr(parent, child, new)
        swapped[name] = new
    return swapped


def _set_all(model: nn.Module, attr: str, enabled: bool) -> int:
    """Set `attr` in every BinaryLinear and drop its cached weight; returns how many there are."""
    n = 0
    for m in model.modules():
        if isinstance(m, BinaryLinear):
            setattr(m, attr, enabled)
            m.clear_cache()
            n += 1
    return n


def set_cache_dequantized(model: nn.Module, enabled: bool = True) -> int:
    """Turn weight caching on or off in every BinaryLinear; returns how many there are."""
    return _set_all(model, "cache_dequantized", enabled)


def set_kernels(model: nn.Module, enabled: bool = True) -> int:
    """Use the fast kernels (True) or the reference dequantize path (False) in every
    BinaryLinear; returns how many there are."""
    return _set_all(model, "kernels", enabled)
