"""rtn-sign: plain per-row binarization Ŵ = α·sign(W − μ) + μ, no reconstruction.

The baseline every binarization paper beats, and the template for a new method. With
μ = mean_j W_rj and α = mean_j |W_rj − μ| per row r this is BiLLM's first-order binarization
(§3.1) applied to the whole row. sign(0) is taken as +1 so that every weight is one bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import BlockContext, Method, MethodArgumentError, ScaleRounding
from .codes import BinaryCodes, ScaleDtype, to_storage


@dataclass(frozen=True)
class SignArgs:
    groupsize: int = -1  # columns sharing one (α, μ) per row; -1 = the whole row
    scale_dtype: ScaleDtype = "float16"  # storage precision of α, μ (float32: no rounding)
    scale_rounding: ScaleRounding = "after"  # round once after the layer, or "in_loop"


def row_binarize(W: Tensor, scale_dtype: ScaleDtype = "float16") -> tuple[Tensor, Tensor, Tensor]:
    """First-order binarization of each row of W (rows, c).

    Returns alpha (rows,), mu (rows,) rounded to `scale_dtype` and signs (rows, c) bool.
    """
    mu = W.mean(dim=1)  # (rows,)
    alpha = (W - mu[:, None]).abs_().mean(dim=1)  # (rows,)
    return to_storage(alpha, scale_dtype), to_storage(mu, scale_dtype), W >= mu[:, None]


class RtnSign(Method):
    name = "rtn-sign"
    Args = SignArgs
    feedback = "none"
    needs_hessian = False

    def __init__(self, args: SignArgs):
        if args.groupsize == 0 or args.groupsize < -1:
            raise MethodArgumentError(f"groupsize={args.groupsize}: use -1 (one α, μ per row) "
                                      "or a positive number of columns")
        super().__init__(args)

    def block_size(self, default: int, cols: int) -> int:
        return cols if self.args.groupsize == -1 else self.args.groupsize

    def fit(self, W: Tensor, ctx: BlockContext) -> BinaryCodes:
        rows, B = W.shape
        alpha, mu, signs = row_binarize(W, self.loop_dtype)
        return BinaryCodes(
            group=torch.zeros(rows, B, dtype=torch.uint8, device=W.device),
            signs=signs[None], alpha=alpha[None, None, :, None], mu=mu[None, :, None],
            beta=None, salient_cols=torch.zeros(B, dtype=torch.bool, device=W.device),
            orders=(1,), n_salient=0, block_size=B, scale_dtype=self.loop_dtype)

    def round(self, W: Tensor, grid: BinaryCodes, cols: slice) -> Tensor:
        return grid.signs[:, :, cols]  # (1, rows, c)

    def dequantize(self, grid: BinaryCodes, levels: Tensor, cols: slice) -> Tensor:
        return grid.dequantize()[:, cols]

    def codes(self, grids: list[BinaryCodes], levels: Tensor) -> BinaryCodes:
        return BinaryCodes.cat(grids)
