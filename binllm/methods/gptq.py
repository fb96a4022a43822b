"""gptq: uniform asymmetric min–max quantization with GPTQ's column-wise error feedback.

The integer baseline of the papers' tables (GPTQ, Frantar et al. 2023). Per row (groupsize
−1, parameters fitted once on the original W as the reference does) or per group of columns
(parameters fitted on the fed-back block at block start; groupsize must divide block_size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import BlockContext, Method, MethodArgumentError, ScaleRounding
from .codes import ScaleDtype, UniformCodes, to_storage


@dataclass(frozen=True)
class GPTQArgs:
    bits: int = 4
    groupsize: int = -1  # -1 = one (scale, zero) per row
    scale_dtype: ScaleDtype = "float16"  # storage precision of the scale (float32: no rounding)
    scale_rounding: ScaleRounding = "after"  # round once after the layer, or "in_loop"


def minmax_params(W: Tensor, bits: int,
                  scale_dtype: ScaleDtype = "float16") -> tuple[Tensor, Tensor]:
    """Asymmetric min–max grid per row of W (rows, c): scale (rows,), integer zero (rows,).

    x_min = min(0, min W), x_max = max(0, max W); an all-zero row gets [−1, 1]. The scale is
    rounded to `scale_dtype` before the zero point is derived from it.
    """
    maxq = 2 ** bits - 1
    xmin = W.min(dim=1).values.clamp(max=0)  # (rows,)
    xmax = W.max(dim=1).values.clamp(min=0)  # (rows,)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = to_storage((xmax - xmin) / maxq, scale_dtype)
    zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_uniform(W: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Levels q = clamp(round(W/scale) + zero, 0, 2^bits − 1) as uint8; scale, zero broadcast."""
    return torch.clamp(torch.round(W / scale) + zero, 0, 2 ** bits - 1).to(torch.uint8)


@dataclass(frozen=True)
class UniformGrid:
    scale: Tensor  # (rows, ngroups_in_block)
    zero: Tensor   # (rows, ngroups_in_block)
    groupsize: int  # columns per group inside the block


class GPTQ(Method):
    name = "gptq"
    Args = GPTQArgs
    feedback = "column"

    def __init__(self, args: GPTQArgs):
        if not 1 <= args.bits <= 8:
            raise MethodArgumentError(f"bits={args.bits}: gptq supports 1 to 8 bits")
        if args.groupsize == 0 or args.groupsize < -1:
            raise MethodArgumentError(f"groupsize={args.groupsize}: use -1 (one scale per row) "
                                      "or a positive number of columns that divides the block "
                                      "size, e.g. 128")
        super().__init__(args)

    def prepare(self, W: Tensor, H: Tensor | None, U: Tensor | None, *,
                original: Tensor | None = None):
        a = self.args
        if a.groupsize != -1:
            return None
        scale, zero = minmax_params(W if original is None else original, a.bits, self.loop_dtype)
        return UniformGrid(scale[:, None], zero[:, None], groupsize=W.shape[1])

    def fit(self, W: Tensor, ctx: BlockContext) -> UniformGrid:
        if ctx.state is not None:
            return ctx.state
        gs = self.args.groupsize
        if ctx.columns.start % gs:
            raise MethodArgumentError(f"groupsize={gs} must divide the block size")
        params = [minmax_params(W[:, k:k + gs], self.args.bits, self.loop_dtype)
                  for k in range(0, W.shape[1], gs)]
        scale, zero = (torch.stack(p, dim=1) for p in zip(*params))  # (rows, groups in block)
        return UniformGrid(scale, zero, gs)

    def _columns(self, grid: UniformGrid, cols: slice):
        idx = torch.arange(cols.start, cols.stop) // grid.groupsize
        return grid.scale[:, idx], grid.zero[:, idx]  # (rows, c) each

    def round(self, W: Tensor, grid: UniformGrid, cols: slice) -> Tensor:
        scale, zero = self._columns(grid, cols)
        return quantize_uniform(W, scale, zero, self.args.bits)

    def dequantize(self, grid: UniformGrid, levels: Tensor, cols: slice) -> Tensor:
        scale, zero = self._columns(grid, cols)
        return scale * (levels.to(torch.float32) - zero)

    def codes(self, grids: list[UniformGrid], levels: Tensor) -> UniformCodes:
        if self.args.groupsize == -1:
            scale, zero, gs = grids[0].scale, grids[0].zero, levels.shape[1]
        else:
            scale = torch.cat([g.scale for g in grids], 1)
            zero = torch.cat([g.zero for g in grids], 1)
            gs = self.args.groupsize
        return UniformCodes(q=levels, scale=scale, zero=zero, bits=self.args.bits, groupsize=gs,
                            scale_dtype=self.loop_dtype)
