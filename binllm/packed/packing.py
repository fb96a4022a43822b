"""The packed form of every layer's codes: bit streams, float scales, shapes declared up front.

A binarized linear `<prefix>` is stored as the tensors `<prefix>.<suffix>` of its codes
format and nothing else. Every tensor's shape and dtype is a pure function of
(out_features, in_features, params), where `params` is the layer's small JSON record in
config.json (`PackedLayout`); the data-dependent counts a format needs (salient columns,
salient weights) are part of `params`, so a loader allocates every buffer before it reads a
byte and can refuse a tensor of the wrong shape by looking at the file header only.

Bit streams (format_version 1) are 1-D uint8 tensors. The elements of the logical array are
taken in row-major order; element i sits at bit i % 8 of byte i // 8 (little-endian within a
byte); the last byte is padded with zeros. An n-bit integer stream stores element i's bits,
least significant first, as the elements n·i … n·i + n − 1 of a bit stream. Scales and means
are stored in the codes' `scale_dtype`, recorded as the layout param "scale_dtype": "float16"
(the default; layouts without the param, written before it existed, read as fp16) or
"float32". The codes already hold them rounded to that precision (`Method.store` rounds a
layer's codes once after its loop, `codes.round_scales` / `codes.to_storage`), and packing
refuses values that are not, since the saved model would then differ from the one in memory.
Tensors with no element are not stored. `codes.stored_bits()` counts exactly these bytes.
The per-format tables are in `binllm.packed.formats`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..methods.codes import SCALE_DTYPES
from ..errors import BinllmError

FLOAT_DTYPE = torch.float16  # scales and means of layouts without a "scale_dtype" param


class PackingError(BinllmError, ValueError):
    """Codes that cannot be stored losslessly, or packed tensors that do not fit their layout."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def bit_spec(n_bits: int) -> TensorSpec:
    """The uint8 stream holding n_bits bits."""
    return TensorSpec(((n_bits + 7) // 8,), torch.uint8)


def scale_dtype_name(params: Mapping[str, Any]) -> str:
    """A layout's "scale_dtype" ("float16" when the param is absent: older layouts), checked."""
    name = params.get("scale_dtype", "float16")
    if name not in SCALE_DTYPES:
        raise PackingError(f"scale_dtype={name!r}: this binllm stores scales as "
                           f"{' or '.join(SCALE_DTYPES)}")
    return name


def scale_dtype_of(params: Mapping[str, Any]) -> torch.dtype:
    """The dtype a layout stores its scales and means in."""
    return SCALE_DTYPES[scale_dtype_name(params)]


def float_spec(*shape: int, dtype: torch.dtype = FLOAT_DTYPE) -> TensorSpec:
    return TensorSpec(tuple(shape), dtype)


# -- bit primitives ----------------------------------------------------------------------
def pack_bits(bits: Tensor) -> Tensor:
    """Pack booleans (…, n) into uint8 (…, ⌈n/8⌉) along the last dim, little-endian in a byte.

    Element j of the last dim goes to bit j % 8 (value 2^(j % 8)) of byte j // 8; the last
    byte is zero-padded. Worked example, 9 bits → 2 bytes:

        bits    1 0 1 1 0 0 0 0 | 1
        byte 0  1·1 + 1·4 + 1·8 = 13       byte 1  1·1 = 1

    >>> pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool))
    tensor([13,  1], dtype=torch.uint8)
    >>> unpack_bits(torch.tensor([13, 1], dtype=torch.uint8), 9).int().tolist()
    [1, 0, 1, 1, 0, 0, 0, 0, 1]
    """
    n = bits.shape[-1]
    b = bits.to(torch.uint8)
    if n % 8:
        pad = torch.zeros(*bits.shape[:-1], 8 - n % 8, dtype=torch.uint8, device=bits.device)
        b = torch.cat([b, pad], dim=-1)  # (…, 8m)
    b = b.reshape(*bits.shape[:-1], -1, 8)  # (…, m, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (b << shifts).sum(dim=-1, dtype=torch.uint8)  # (…, m)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of `pack_bits`: uint8 (…, ⌈n/8⌉) → bool (…, n)."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != (n + 7) // 8:
        raise PackingError(f"a stream of {n} bits needs {(n + 7) // 8} uint8 bytes in its last "
                           f"dim, got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[..., None] >> shifts) & 1  # (…, m, 8)
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].bool()  # (…, n)


def pack_uint(values: Tensor, nbits: int) -> Tensor:
    """Pack integers in [0, 2^nbits) (any shape, integer or integral float) into a stream.

    Element i's bits, least significant first, are stream bits nbits·i … nbits·i + nbits − 1:
    the values [1, 2, 3] at 2 bits are the bits 1 0 | 0 1 | 1 1, i.e. the byte 0b111001 = 57.

    >>> pack_uint(torch.tensor([1, 2, 3]), 2)
    tensor([57], dtype=torch.uint8)
    """
    v = values.reshape(-1)
    if nbits == 0:
        if v.numel() and bool((v != 0).any()):
            raise PackingError("a 0-bit stream can only hold zeros")
        return torch.zeros(0, dtype=torch.uint8, device=values.device)
    if not 1 <= nbits <= 8:
        raise PackingError(f"nbits={nbits}: integer streams hold 1 to 8 bits per value")
    if v.numel():
        lo, hi = v.min().item(), v.max().item()
        integral = not v.is_floating_point() or torch.equal(v, v.round())
        if lo < 0 or hi > 2 ** nbits - 1 or not integral:
            raise PackingError(f"values in [{lo}, {hi}] do not fit unsigned {nbits}-bit integers")
    v = v.to(torch.uint8)
    if nbits == 8:
        return v.clone()
    if 8 % nbits == 0:  # whole values per byte: value i at bits (i % per)·nbits of byte i // per
        per = 8 // nbits
        v = torch.cat([v, v.new_zeros(-v.numel() % per)]).reshape(-1, per)  # (bytes, per)
        shifts = torch.arange(0, 8, nbits, dtype=torch.uint8, device=v.device)
        return (v << shifts).sum(dim=1, dtype=torch.uint8)
    shifts = torch.arange(nbits, dtype=torch.uint8, device=v.device)
    return pack_bits(((v[:, None] >> shifts) & 1).reshape(-1))  # bits of (N, nbits), flat


def unpack_uint(packed: Tensor, n: int, nbits: int) -> Tensor:
    """Inverse of `pack_uint`: n values as uint8 (n,)."""
    if nbits == 0:
        return torch.zeros(n, dtype=torch.uint8, device=packed.device)
    if nbits == 8:
        if packed.shape != (n,) or packed.dtype != torch.uint8:
            raise PackingError(f"an 8-bit stream of {n} values needs uint8 ({n},), got "
                               f"{packed.dtype} {tuple(packed.shape)}")
        return packed
    if 8 % nbits == 0:
        per = 8 // nbits
        if packed.dtype != torch.uint8 or packed.shape != ((n + per - 1) // per,):
            raise PackingError(f"a {nbits}-bit stream of {n} values needs uint8 "
                               f"({(n + per - 1) // per},), got {packed.dtype} "
                               f"{tuple(packed.shape)}")
        shifts = torch.arange(0, 8, nbits, dtype=torch.uint8, device=packed.device)
        return ((packed[:, None] >> shifts) & (2 ** nbits - 1)).reshape(-1)[:n]  # (n,)
    bits = unpack_bits(packed, n * nbits).reshape(n, nbits).to(torch.uint8)  # (n, nbits)
    shifts = torch.arange(nbits, dtype=torch.uint8, device=packed.device)
    return (bits << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_uint_rows(packed: Tensor, rows: int, per_row: int, nbits: int, ids: Tensor) -> Tensor:
    """Rows `ids` (n,) of a `pack_uint` stream of rows × per_row values, as uint8 (n, per_row).
    Where a row is whole bytes only those bytes are unpacked; otherwise the whole stream."""
    if per_row * nbits % 8:
        return unpack_uint(packed, rows * per_row, nbits).view(rows, per_row)[ids]
    picked = packed.view(rows, per_row * nbits // 8)[ids].reshape(-1)  # (n · row bytes,)
    return unpack_uint(picked, ids.numel() * per_row, nbits).view(-1, per_row)


def to_exact(x: Tensor, name: str, dtype: torch.dtype = FLOAT_DTYPE) -> Tensor:
    """x as `dtype`, refusing values that `dtype` does not hold exactly."""
    h = x.to(dtype, copy=True)  # a copy also for fp32: the packed tensors own their memory
    if not torch.equal(h.to(x.dtype), x):
        raise PackingError(
            f"{name} holds values that are not exact in fp{dtype.itemsize * 8}: round the "
            "codes' scales and means to their scale_dtype first (codes.round_scales or "
            "to_storage), or the saved model would not reproduce the one in memory")
    return h


# -- the contract of a codes format (instances in binllm.packed.formats) ----------------------
@dataclass(frozen=True)
class CodesFormat:
    """How one codes container is stored: its params, tensor specs and the pack/unpack pair.

    params(codes) -> JSON-able dict;  specs(rows, cols, params) -> {suffix: TensorSpec};
    pack(codes) -> {suffix: Tensor};  unpack({suffix: Tensor}, rows, cols, params) -> codes.
    """

    name: str
    codes_type: type
    params: Callable[[Any], dict[str, Any]]
    specs: Callable[[int, int, Mapping[str, Any]], dict[str, TensorSpec]]
    pack: Callable[[Any], dict[str, Tensor]]
    unpack: Callable[[Mapping[str, Tensor], int, int, Mapping[str, Any]], Any]
    check: Callable[[int, int, Mapping[str, Any]], None]  # raises PackingError on bad params
