"""A binarized linear's layout record and its pack/unpack, on top of the formats registry.

`PackedLayout` is what config.json records per binarized linear (format name, shape, params);
`pack(codes)` / `unpack(layout, tensors)` go through the format registered for the codes type
in `binllm.packed.formats`, whose primitives live in `binllm.packed.packing`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .formats import FORMATS
from .packing import CodesFormat, PackingError, TensorSpec

FORMAT_VERSION = 1  # version of the on-disk layout written into quantization_config


def format_named(name: str) -> CodesFormat:
    formats = FORMATS
    if name not in formats:
        raise PackingError(f"unknown packed format {name!r} (this binllm knows "
                           f"{', '.join(formats)}); the model was written by a newer binllm")
    return formats[name]


def format_of(codes: Any) -> CodesFormat:
    for fmt in FORMATS.values():
        if type(codes) is fmt.codes_type:
            return fmt
    raise PackingError(f"no packed format for {type(codes).__name__}; register one in "
                       "binllm/packed/formats.py")


@dataclass(frozen=True)
class PackedLayout:
    """What config.json records per binarized linear: enough to allocate its buffers."""

    format: str
    out_features: int
    in_features: int
    params: Mapping[str, Any]

    def __post_init__(self):
        if self.out_features < 1 or self.in_features < 1:
            raise PackingError(f"layout shape ({self.out_features}, {self.in_features}) is empty")
        format_named(self.format).check(self.out_features, self.in_features, self.params)

    def specs(self) -> dict[str, TensorSpec]:
        """The stored tensors (those with at least one element), by key suffix."""
        specs = format_named(self.format).specs(self.out_features, self.in_features, self.params)
        return {k: s for k, s in specs.items() if s.numel > 0}

    def stored_bits(self) -> int:
        return sum(s.nbytes for s in self.specs().values()) * 8

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "shape": [self.out_features, self.in_features],
                "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PackedLayout:
        try:
            out_features, in_features = (int(x) for x in d["shape"])
            return cls(str(d["format"]), out_features, in_features, dict(d["params"]))
        except (KeyError, TypeError, ValueError) as e:
            raise PackingError(f"malformed layer layout {dict(d)!r}: {e}") from None


def pack(codes: Any) -> tuple[PackedLayout, dict[str, Tensor]]:
    """(layout, tensors by suffix) of a layer's codes; the tensors match `layout.specs()`."""
    fmt = format_of(codes)
    rows, cols = codes.shape
    layout = PackedLayout(fmt.name, rows, cols, fmt.params(codes))
    specs = layout.specs()
    tensors = {k: v.contiguous() for k, v in fmt.pack(codes).items() if k in specs}
    check_tensors(layout, tensors, specs)  # a format whose pack disagrees with its specs is a bug
    return layout, tensors


def check_tensors(layout: PackedLayout, tensors: Mapping[str, Any],
                  specs: Mapping[str, TensorSpec] | None = None, where: str = "") -> None:
    """Refuse missing, unexpected or mis-shaped tensors (anything with .shape and .dtype)."""
    specs = layout.specs() if specs is None else specs
    missing, extra = sorted(set(specs) - set(tensors)), sorted(set(tensors) - set(specs))
    if missing or extra:
        raise PackingError(f"{where or layout.format} layer: missing tensors {missing}, "
                           f"unexpected tensors {extra} (expected {sorted(specs)})")
    for k, spec in specs.items():
        t = tensors[k]
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            raise PackingError(f"{where}.{k}: expected {spec.dtype} {spec.shape}, found "
                               f"{t.dtype} {tuple(t.shape)}; the file does not match config.json")


def unpack(layout: PackedLayout, tensors: Mapping[str, Tensor]) -> Any:
    """The codes stored in `tensors` (as `pack` wrote them), on the tensors' device."""
    specs = layout.specs()
    check_tensors(layout, tensors, specs)
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    full = dict(tensors)
    fmt = format_named(layout.format)
    every = fmt.specs(layout.out_features, layout.in_features, layout.params)
    for k, s in every.items():  # empty tensors are not stored; hand the format empty ones
        full.setdefault(k, torch.empty(s.shape, dtype=s.dtype, device=device))
    return format_named(layout.format).unpack(full, layout.out_features, layout.in_features,
                                              layout.params)
