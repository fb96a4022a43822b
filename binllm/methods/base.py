"""The method seam: what a binarizer implements to plug into the one reconstruction loop.

A method decides the grid (masks, scales, means) of a block of columns and how weights are
rounded onto it; it never sees modules, hooks or files. The loop (`binllm.engine.reconstruct`)
calls, for each block of columns:

    grid   = method.fit(W_blk, ctx)              # once at block start, on the fed-back block
    levels = method.round(W_cols, grid, cols)    # every column ("column") or the block ("block")
    Q_cols = method.dequantize(grid, levels, cols)

and at the end `method.codes(grids, levels)` assembles the layer's codes, whose
`dequantize()` equals the Q the loop used, and `method.store(codes)` rounds their scales and
means once to the storage precision.

Scales and means inside the loop are fp32, as the reference code keeps them
(`scale_rounding="after"`, every method's default); `scale_rounding="in_loop"` rounds them to
`scale_dtype` before Ŵ and the error feedback instead (a named option; on
stories260K it moved perplexity by −13 % to +38 % against the references, README).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor

from .codes import ScaleDtype, round_scales
from ..errors import BinllmError

Feedback = Literal["column", "block", "none"]
# When scales and means are rounded to `scale_dtype`: "after" the layer's reconstruction, once
# (the loop keeps them fp32, as the references), or "in_loop", before Ŵ and the feedback.
ScaleRounding = Literal["after", "in_loop"]


@dataclass(frozen=True)
class BlockContext:
    """What a method may look at for the block [i1, i2) of a layer.

    | name    | meaning                                                  | shape   |
    |---------|----------------------------------------------------------|---------|
    | H       | block of H (dead columns fixed, undamped); ARB-X's 2·S   | (B, B)  |
    | U       | block of the upper Cholesky factor of the damped H⁻¹     | (B, B)  |
    | columns | position of the block inside the layer                   | slice   |
    | state   | what `prepare` returned for the whole layer              | any     |
    | feedback| the loop's error feedback for this layer                 | str     |
    """

    H: Tensor | None
    U: Tensor | None
    columns: slice
    state: Any = None
    feedback: Feedback = "block"


class Method:
    """Base class of every method; subclasses set `name`, `Args` and the four hooks."""

    name: ClassVar[str]
    Args: ClassVar[type]
    feedback: ClassVar[Feedback] = "block"
    needs_hessian: ClassVar[bool] = True
    needs_gram: ClassVar[bool] = False  # uses S = H_blk/2 per block (ARB-X): a heavier solve
    feedbacks: ClassVar[tuple[Feedback, ...]] = ("column", "block", "none")  # loops it runs in
    # said in the run's report when it runs without `refine` (its codes are meant to be trained)
    unrefined_note: ClassVar[str | None] = None

    def __init__(self, args):
        self.args = args

    def uses_hessian(self, feedback: Feedback | None = None) -> bool:
        """Whether calibration must accumulate H for this method: its grid needs H, or the
        loop feeds errors back through it (`feedback`: the loop's override, else the
        method's own)."""
        return self.needs_hessian or (feedback or self.feedback) != "none"

    def block_size(self, default: int, cols: int) -> int:
        """Columns per reconstruction block for a layer of `cols` columns; the loop's
        `block_size` unless the method fixes its own (BiLLM's, block-sign's `block`)."""
        return default

    def prepare(self, W: Tensor, H: Tensor | None, U: Tensor | None, *,
                original: Tensor | None = None) -> Any:
        """Layer-wide state computed once before the blocks; default none.

        W (rows, cols) has its dead columns zeroed; `original` is W before that (GPTQ and
        PB-LLM fit their min–max grids on it, as their reference code does).
        """
        return None

    def fit(self, W: Tensor, ctx: BlockContext) -> Any:
        raise NotImplementedError

    def round(self, W: Tensor, grid: Any, cols: slice) -> Tensor:
        """Integer/boolean levels of the columns `cols` (relative to the block);
        last dim = columns."""
        raise NotImplementedError

    def dequantize(self, grid: Any, levels: Tensor, cols: slice) -> Tensor:
        raise NotImplementedError

    def codes(self, grids: list, levels: Tensor):
        raise NotImplementedError

    @property
    def loop_dtype(self) -> ScaleDtype:
        """Precision of scales and means inside the loop: `scale_dtype` with
        `scale_rounding="in_loop"`, else fp32 (the reference code)."""
        a = self.args
        in_loop = getattr(a, "scale_rounding", "after") == "in_loop"
        return getattr(a, "scale_dtype", "float32") if in_loop else "float32"

    def store(self, codes):
        """The finished layer's codes at their storage precision `scale_dtype` (rounded once);
        as they are for a method without that argument."""
        dtype = getattr(self.args, "scale_dtype", None)
        return codes if dtype is None else round_scales(codes, dtype)


class MethodArgumentError(BinllmError, ValueError):
    """An unknown method, unknown argument or a value of the wrong type."""


def _convert(value: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        for c in choices:
            if str(c) == value:
                return c
        raise MethodArgumentError(f"{key}={value!r}: choose one of {', '.join(map(str, choices))}")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        opts = [t for t in typing.get_args(typ) if t is not type(None)]
        if value.lower() == "none" and len(opts) < len(typing.get_args(typ)):
            return None
        return _convert(value, opts[0], key)
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(value)
    except ValueError:
        raise MethodArgumentError(
            f"{key}={value!r}: expected a value of type {typ.__name__}") from None


def parse_args(Args: type, overrides: dict[str, Any]) -> Any:
    """Build a frozen Args dataclass from defaults plus overrides (strings are converted)."""
    hints = typing.get_type_hints(Args)
    known = {f.name for f in dataclasses.fields(Args)}
    values = {}
    for key, value in overrides.items():
        if key not in known:
            raise MethodArgumentError(
                f"unknown method argument {key!r}; "
                f"this method takes: {', '.join(sorted(known)) or 'none'}")
        values[key] = _convert(value, hints[key], key) if isinstance(value, str) else value
    return Args(**values)


def describe_args(Args: type) -> list[tuple[str, str, Any]]:
    """(name, type, default) of every argument, for `binllm methods`."""
    hints = typing.get_type_hints(Args)
    return [(f.name, _type_name(hints[f.name]), f.default) for f in dataclasses.fields(Args)]


def _type_name(typ: Any) -> str:
    """'int', 'bool', 'hessian|magnitude' — what a user may write after KEY=."""
    if typing.get_origin(typ) is Literal:
        return "|".join(map(str, typing.get_args(typ)))
    return getattr(typ, "__name__", str(typ).replace("typing.", ""))
