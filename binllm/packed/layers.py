"""BinaryLinear: a linear layer computed from its packed codes.

The packed tensors of `binllm.packed.packing` are the module's buffers, so `state_dict()` keys are
the on-disk keys and `.to(device)` moves them. Three forwards, chosen per layer:

- kernels (the default): the codes' kernel form (`binllm.kernels.form`, bit planes and
  coefficients, derived once from the buffers on the first forward) and the fast kernels of
  `binllm.kernels` compute y = x Ŵᵀ + b from the bits; no dequantized weight is kept, and y
  equals the reference to fp32 round-off. The first call binds the chosen kernel's decoder
  (`binllm.kernels.form_decoder`); later calls go to it first, so a decode step (CPU, at most
  `GEMV_MAX` rows) is one compiled call with no dispatch in Python, and whatever it declines
  takes the registry's path.
- reference (`kernels=False`): W = unpack(layout, buffers).dequantize(), the codes' own
  dequantize() as in calibration, then F.linear(x, W.to(x.dtype), bias), at every call: bit for
  bit the calibrated fake-quantized model.
- `cache_dequantized`: the reference weight is kept after the first forward (memory of an fp
  weight, speed of nn.Linear) until the buffers change.

`int8_prefill` (off unless `set_int8_prefill` turns it on) sends a prompt's product (more than
`GEMV_MAX` rows, on the CPU) to the int8 prefill (`binllm.kernels.int8_linear`): faster, and
approximate (x and Ŵ's rows rounded to int8), so it is the user's choice; decode stays exact.

One representation at a time: a layer loaded from a saved directory (`binllm.load`,
`from_pretrained`) gets a `PackedSource` (`binllm.packed.source`: its shard, byte ranges and
sha256) and releases its packed buffers once the representation its forward computes from is
built (the kernel form, or the cached weight), so it holds the form alone, not the form plus
the codes. The buffers are read back exactly (digest-checked) where something needs them:
`state_dict()` and `save_pretrained` (the tensors returned are the file's bytes), `.codes()`,
`.dequantize()`, the reference forward (which restores them, resident, for as long as it is
chosen), `load_state_dict` (restored, then overwritten), the GPU sign kernel that reads the
packed bits (restored, the form dropped). Device moves move the form (and where released,
only the device the codes are read back onto). Layers built in memory (`from_codes`) have no
source and keep their buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import DecoderFn, form_decoder, form_linear, int8_linear, layer_kernel
from ..kernels import cpu as kernels_cpu
from ..kernels.form import KernelForm, kernel_form
from .layout import PackedLayout, pack, unpack
from .packing import PackingError
from .source import PackedSource


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
        self.int8_prefill = False  # set_int8_prefill: prompts in int8 arithmetic
        self._cached: Tensor | None = None
        self._form: KernelForm | None = None
        self._decode: DecoderFn | None = None  # the form's decoder, bound at its first forward
        self._dense_held = False        # hold_dense: Ŵ dequantized once, kept while held
        self._dense: Tensor | None = None
        self._dense_for: tuple = ()     # the (dtype, device) of the x that _dense serves
        self._source: PackedSource | None = None  # where the packed tensors can be read back
        self._source_verified = False  # the resident buffers are known to be the source's bytes
        self._released = False         # packed buffers dropped (read back from _source)
        self._home: torch.device | None = None  # their device while released

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
        """The packed tensors by suffix: the buffers, or, released, read back from the source."""
        if self._released:
            return {k: v.to(self._home) for k, v in self._source.read().items()}
        return {name: self._buffers[name] for name in self.layout.specs()}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            d = self.__dict__
            if d.get("_released") and name in d["layout"].specs():
                return self.packed()[name]
            raise

    # -- one representation: releasing the packed buffers ----------------------------------
    def set_packed(self, tensors: dict[str, Tensor], source: PackedSource | None = None) -> None:
        """Take `tensors` (by suffix) as the packed buffers; `source` (their file, whose bytes
        they are) lets the layer release them once its forward no longer reads them."""
        for name in self.layout.specs():
            self._buffers[name] = tensors[name]
        self.clear_cache()
        self._source, self._source_verified, self._released = source, source is not None, False

    def attach_source(self, source: PackedSource) -> bool:
        """Attach the file the resident buffers came from, if they hold exactly its bytes."""
        if self._released or not source.matches(self.packed()):
            return False
        self._source, self._source_verified = source, True
        return True

    def is_released(self) -> bool:
        return self._released

    def prepare(self) -> None:
        """Build what the forward computes from (the kernel form on the kernel path) and
        release the packed buffers where a source can give them back."""
        if self.kernels and not self.cache_dequantized:
            self.kernel_form()
        self._release_if_possible()

    def _reads_buffers(self) -> bool:
        return not self.kernels and not self.cache_dequantized  # the reference forward

    def _release_if_possible(self) -> None:
        if self._source is None or self._released or self._reads_buffers():
            return
        if not self._source_verified and not self._source.matches(self.packed()):
            self._source = None  # the buffers were changed: they are the only copy now
            return
        self._home = self.layout_device()
        for name in self.layout.specs():
            del self._buffers[name]
        self._released, self._source_verified = True, False

    def _restore(self) -> None:
        """Read the released buffers back (resident until released again)."""
        tensors = self._source.read()
        for name in self.layout.specs():
            self._buffers[name] = tensors[name].to(self._home)
        self._released, self._source_verified = False, False

    def held_bytes(self) -> int:
        """Bytes this layer holds in memory: resident packed buffers, kernel form, what its
        bound decoder keeps beside the form (`nbytes`, where it says), cached weight (bias
        excluded)."""
        held = 0 if self._released else \
            sum(t.numel() * t.element_size() for t in self.packed().values())
        if self._form is not None:
            held += self._form.nbytes()
        held += getattr(self._decode, "nbytes", 0)
        for dense in (self._cached, self._dense):
            if dense is not None:
                held += dense.numel() * dense.element_size()
        return held

    def codes(self) -> Any:
        """The layer's codes, unpacked from the buffers (vectorised)."""
        return unpack(self.layout, self.packed())

    def dequantize(self) -> Tensor:
        """Ŵ (out_features, in_features) fp32: exactly the weights calibration produced."""
        return self.codes().dequantize()

    def stored_bits(self) -> int:
        """Bits of the packed buffers (bias excluded), as stored on disk."""
        return self.layout.stored_bits()

    def weight_for(self, dtype: torch.dtype) -> Tensor:
        if not self.cache_dequantized:
            return self.dequantize().to(dtype)
        if self._cached is None or self._cached.dtype != dtype \
                or self._cached.device != self.layout_device():
            self._cached = self.dequantize().to(dtype)
            self._release_if_possible()
        return self._cached

    def layout_device(self) -> torch.device:
        if self._released:
            return self._home
        return next(iter(self.packed().values())).device

    def hold_dense(self, enabled: bool) -> None:
        """While enabled, the forward dequantizes Ŵ once (to the input's dtype and device, at
        the first call) and computes F.linear with it: the reference forward's result at
        nn.Linear's speed, for a run of many calls (a layer run on every evaluation window).
        A layer asked for the int8 prefill (`set_int8_prefill`) computes prompts that way
        instead, held or not.
        Disabling drops that weight; the kernel form and the buffers are left as they are."""
        self._dense_held, self._dense = enabled, None

    @property
    def dense_held(self) -> bool:
        return self._dense_held

    def dense_linear(self, x: Tensor) -> Tensor:
        """F.linear(x, Ŵ, bias) with Ŵ dequantized once and kept (while `hold_dense`). A bf16 x
        on a CPU without bf16 instructions is multiplied in fp32 by the same bf16 weights (kept
        in fp32) and y rounded once to bf16: the same product to bf16 round-off, several times
        faster there than torch's converted bf16 GEMM (`kernels.cpu.fast_bf16_matmul`)."""
        if self._dense is None or self._dense_for != (x.dtype, x.device):
            W = self.dequantize().to(dtype=x.dtype)
            wide = x.dtype == torch.bfloat16 and x.device.type == "cpu" \
                and not kernels_cpu.fast_bf16_matmul()
            self._dense = (W.float() if wide else W).to(x.device)
            self._dense_for = (x.dtype, x.device)
        W = self._dense
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if W.dtype == x.dtype:
            return F.linear(x, W, bias)
        return F.linear(x.to(W.dtype), W, None if bias is None else bias.to(W.dtype)).to(x.dtype)

    def clear_cache(self) -> None:
        self._cached = None
        self._form = self._decode = None

    def kernel_form(self) -> KernelForm:
        """The codes' kernel form, derived from the buffers once (dropped when they change)."""
        if self._form is None:
            self._form = kernel_form(self.codes())
            self._release_if_possible()
        return self._form

    def decode_call(self, x: Tensor) -> DecoderFn | None:
        """The compiled call this layer's forward tries first for a token like x (x's device
        and dtype), bound now if it is not yet: `call(x, bias)` returns y or None (see
        `binllm.kernels.form_decoder`). None where the forward does not start with one: the
        reference forward, a cached weight, or a kernel that reads the packed buffers itself."""
        if not self.kernels or self.cache_dequantized or layer_kernel(self, x) is not None:
            return None
        if self._decode is None:
            self._decode = form_decoder(self.kernel_form(), x)
        return self._decode

    def forward(self, x: Tensor) -> Tensor:
        if self._decode is not None and self.kernels and not self.cache_dequantized:
            # decode: one compiled call, or None (the bias read as nn.Module does, with no
            # detour through __getattr__)
            y = self._decode(x, self._parameters["bias"])
            if y is not None:
                return y
        if (self.int8_prefill and self.kernels and not self.cache_dequantized
                and x.device.type == "cpu" and x.numel() > kernels_cpu.GEMV_MAX * x.shape[-1]):
            y = int8_linear(self.kernel_form(), x, self._parameters["bias"])
            if y is not None:  # a prompt on the CPU; None: it cannot run here
                return y
        if self._dense_held:
            return self.dense_linear(x)
        direct = layer_kernel(self, x)  # a kernel reading the packed buffers (LAYER_KERNELS)
        if direct is not None:
            if self._released:
                self._restore()  # that kernel reads the packed bits: they replace the form
                self._form = self._decode = None
            return direct.matmul(self, x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kernels and not self.cache_dequantized:
            form = self.kernel_form()
            if self._decode is None:
                self._decode = form_decoder(form, x)  # for x's device, bound once
            return form_linear(form, x, bias)
        if self._released and self._reads_buffers():
            self._restore()  # the reference forward dequantizes at every call
        return F.linear(x, self.weight_for(x.dtype), bias)

    def __getstate__(self):
        """The module's state without its bound decoder (compiled, not copyable): a copy or a
        pickle binds its own at its first forward."""
        state = super().__getstate__()
        return {**state, "_decode": None}

    def _apply(self, fn, recurse: bool = True):
        """Packed buffers follow device moves but keep their dtype (fp16 or fp32 scales stay so
        under model.half() / .to(torch.bfloat16), so the codes never change); the kernel form
        moves with them (its fp32 coefficients stay fp32)."""
        self._cached = self._dense = None
        packed = {name: self._buffers.pop(name) for name in self.layout.specs()
                  if name in self._buffers}
        ref = self._home if self._released else next(iter(packed.values())).device
        device = fn(torch.empty(0, device=ref)).device
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in packed.items():
                self._buffers[name] = buf.to(device)
        if self._form is not None:
            self._form = self._form.to(device)
        self._decode = None  # bound again, to the moved form, at the next forward
        if self._released:
            self._home = device
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._released:  # the file's bytes, read back (bias first, as for resident buffers)
            for name, t in self.packed().items():
                destination[prefix + name] = t

    def _load_from_state_dict(self, *args, **kwargs):
        if self._released:  # the buffers receive the new values (or keep the old ones)
            self._restore()
        self.clear_cache()
        self._source_verified = False
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        n = self.in_features * self.out_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.layout.format}, "
                f"bits/weight={self.layout.stored_bits() / n:.3f}, "
                f"kernels={self.kernels}, cache_dequantized={self.cache_dequantized}"
                + (", packed=released" if self._released else ""))


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` below `root` (its parent must exist)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


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


def _set_all(model: nn.Module, attr: str, enabled: bool, clear: bool = True) -> int:
    """Set `attr` in every BinaryLinear, dropping its cached weight and form where it changes
    and `clear` asks (an unchanged layer keeps what it derived); returns how many there are."""
    n = 0
    for m in model.modules():
        if isinstance(m, BinaryLinear):
            if getattr(m, attr) != enabled:
                setattr(m, attr, enabled)
                if clear:
                    m.clear_cache()
            n += 1
    return n


def set_cache_dequantized(model: nn.Module, enabled: bool = True) -> int:
    """Turn weight caching on or off in every BinaryLinear; returns how many there are."""
    return _set_all(model, "cache_dequantized", enabled)


def set_int8_prefill(model: nn.Module, enabled: bool = True) -> int:
    """Compute prompts (more than GEMV_MAX rows on the CPU) of every BinaryLinear by the int8
    prefill, approximate and faster (True), or exactly (False); returns how many there are.
    Each layer keeps its kernel form and decoder: the int8 prefill reads the same form."""
    return _set_all(model, "int8_prefill", enabled, clear=False)


def set_kernels(model: nn.Module, enabled: bool = True) -> int:
    """Use the fast kernels (True) or the reference dequantize path (False) in every
    BinaryLinear; returns how many there are."""
    return _set_all(model, "kernels", enabled)
