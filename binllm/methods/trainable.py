"""Codes as trainable tensors: the continuous parameters of a layer's codes, and latent signs.

Refinement (`binllm.engine.refine`) trains what a codes container holds in floating point
(its `SCALE_FIELDS`: α, μ, β, PB-LLM's high-bit step, GPTQ's step) and, for containers with
sign planes (`SIGN_FIELDS`), latent weights whose signs are the planes, through a
straight-through estimator, so that a sign may flip. Bitmaps, salient masks, group maps,
integer levels and zero points stay as they are: the stored layout and its bit count do not
change.

The weight is always the container's own `dequantize()` of the trainable fields, so the
trained Ŵ is exactly what the packed model computes with once `TrainableCodes.codes()` has
rounded the fields to their storage precision.

Learning rates are relative: a field's Adam step is `lr · mean|x₀|` of its initial value x₀,
and latent weights start at S · |W| / mean_row|W| (W the full-precision weight), so one
`sign_lr` step moves a latent weight by that fraction of its row's typical magnitude and the
weights that flip first are the ones closest to zero. Codes whose sign planes are not shaped
like W (the factors of binary-factor, (rows, r) and (cols, r)) say what plays |W|'s part:
their `latent_magnitudes(W)` gives each plane's relative magnitudes, and their `SIGN_STEP`
scales `sign_lr` for those planes (a codes class without it takes `sign_lr` as it is).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .codes import Q8_FIELDS, codes_fields, q8_round, to_storage


class _SignSTE(torch.autograd.Function):
    """Forward: 1.0 where the latent weight is positive, else 0.0 (the codes' sign encoding,
    True = +1). Backward: the straight-through gradient, clipped to |latent| ≤ 1 (relative)."""

    @staticmethod
    def forward(ctx, latent: Tensor) -> Tensor:
        ctx.save_for_backward(latent)
        return (latent > 0).to(latent.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (latent,) = ctx.saved_tensors
        return grad * (latent.abs() <= 1).to(grad.dtype)


def sign_ste(latent: Tensor) -> Tensor:
    """(latent > 0) as 0/1 floats with a straight-through gradient."""
    return _SignSTE.apply(latent)


class TrainableCodes:
    """One linear's codes with their continuous fields (and latent signs) as leaf tensors.

    codes: the stored codes (scales at their storage precision). W: the linear's
    full-precision weight (rows, cols), used only to seed the latent weights' magnitudes.
    train_signs: also train latent signs where the codes have sign planes.
    """

    def __init__(self, codes, W: Tensor, train_signs: bool = True):
        self.initial = codes
        fields = codes_fields(codes)
        self.scales = {f: fields[f].detach().to(torch.float32).clone().requires_grad_(True)
                       for f in type(codes).SCALE_FIELDS if fields[f] is not None}
        self.latent: dict[str, Tensor] = {}
        if train_signs:
            magnitude = _relative_magnitude(W.detach().to(torch.float32))  # (rows, cols)
            for f in type(codes).SIGN_FIELDS:
                S = fields[f].to(torch.float32) * 2 - 1  # (..., rows, cols) ±1
                m = magnitude if S.shape[-2:] == magnitude.shape else \
                    codes.latent_magnitudes(W.detach())[f]  # a plane not shaped like W
                self.latent[f] = (S * m).requires_grad_(True)

    def param_groups(self, lr: float, sign_lr: float) -> list[dict]:
        """Adam parameter groups: one per field, its step relative to the field's size."""
        groups = [{"params": [x], "lr": lr * _typical(x)} for x in self.scales.values()]
        if sign_lr > 0:
            step = sign_lr * getattr(type(self.initial), "SIGN_STEP", 1.0)
            groups += [{"params": [x], "lr": step} for x in self.latent.values()]
        return groups

    def weight(self) -> Tensor:
        """Ŵ (rows, cols) fp32 of the current fields, differentiable in them."""
        signs = {f: sign_ste(x) for f, x in self.latent.items()}
        return replace(self.initial, **self.scales, **signs).dequantize()

    def codes(self):
        """The trained codes at the initial codes' storage precision (8-bit scale codes are
        rounded by `q8_round` again); signs from the latent weights' signs."""
        c = self.initial
        q8_rows = getattr(c, "q8_rows", 0)
        out = {}
        for f, x in self.scales.items():
            x = x.detach()
            if q8_rows and f in Q8_FIELDS:
                out[f] = q8_round(x, q8_rows)
            else:
                out[f] = to_storage(x, c.scale_dtype)
        for f, x in self.latent.items():
            out[f] = x.detach() > 0
        return replace(c, **out)

    def flipped(self) -> int:
        """Signs that differ from the initial codes' planes."""
        return sum(int(((x.detach() > 0) != getattr(self.initial, f)).sum())
                   for f, x in self.latent.items())


def _relative_magnitude(W: Tensor) -> Tensor:
    """|W| / mean|W| of its row (rows, cols), at least 1e-3 so that no latent sits at 0."""
    return (W.abs() / W.abs().mean(1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-3)


def _typical(x: Tensor) -> float:
    """mean |x| over its nonzero entries (1 when all are zero)."""
    nz = x.detach().abs()
    nz = nz[nz > 0]
    return float(nz.mean()) if nz.numel() else 1.0
