"""FactorCodes: a weight matrix as a product of two sign matrices with row and column scales.

    Ŵ = diag(s_out) · S_U · S_Vᵀ · diag(s_in),   S_U = 2·u − 1 (rows, r),  S_V = 2·v − 1 (cols, r)

the representation of NanoQuant (ICML 2026) below one bit per weight (`binary-factor`,
`binllm.methods.binary_factor`). Stored: the two sign planes (r·(rows + cols) bits) and the
two scale vectors (rows + cols values at `scale_dtype`); nothing per weight.

| name   | meaning                                 | shape            |
|--------|-----------------------------------------|------------------|
| u      | signs of the left factor, True = +1     | (rows, r) bool   |
| v      | signs of the right factor, True = +1    | (cols, r) bool   |
| s_out  | row scales                              | (rows,)          |
| s_in   | column scales                           | (cols,)          |

Refinement (`binllm.methods.trainable`) trains s_out, s_in (`SCALE_FIELDS`) and latent
weights behind u and v (`SIGN_FIELDS`) through the straight-through sign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .codes import ScaleDtype, scale_bits


def factor_bits(rows: int, cols: int, rank: int, scale_dtype: ScaleDtype = "float16") -> int:
    """Bits the packed FactorCodes of this shape and rank store: both sign planes as byte-padded
    bit streams, plus rows + cols scales."""
    return (8 * -(-rows * rank // 8) + 8 * -(-cols * rank // 8)
            + (rows + cols) * scale_bits(scale_dtype))


def factor_product(s_out: Tensor, SU: Tensor, SV: Tensor, s_in: Tensor) -> Tensor:
    """diag(s_out) · SU · SVᵀ · diag(s_in) (rows, cols) fp32 for ±1 SU (rows, r), SV (cols, r):
    the ±1 product is exact (integers ≤ r), then both scales, in this order."""
    return s_out[:, None] * (SU @ SV.T) * s_in[None, :]


@dataclass(frozen=True)
class FactorCodes:
    """Ŵ = diag(s_out) · (2u − 1) · (2v − 1)ᵀ · diag(s_in); see the module docstring."""

    SCALE_FIELDS: ClassVar[tuple[str, ...]] = ("s_out", "s_in")
    SIGN_FIELDS: ClassVar[tuple[str, ...]] = ("u", "v")  # bool planes, True = +1
    # Refinement's latent-sign step relative to a per-weight sign plane's: one factor sign
    # moves a whole row (or column) of Ŵ, so its latent weights take steps 100× smaller
    # (SmolLM2-135M layer 10 at bits=1, 4 epochs: layer loss 0.0486 → 0.0371 at this step,
    # raised at 4× it, 0.0424 with the signs fixed; `binllm.methods.trainable`).
    SIGN_STEP: ClassVar[float] = 1e-2

    u: Tensor
    v: Tensor
    s_out: Tensor
    s_in: Tensor
    scale_dtype: ScaleDtype = "float16"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.v.shape[0])

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def dequantize(self) -> Tensor:
        """Ŵ (rows, cols) fp32: the ±1 product is exact (integers ≤ r), then both scales."""
        SU = self.u.to(torch.float32) * 2 - 1  # (rows, r)
        SV = self.v.to(torch.float32) * 2 - 1  # (cols, r)
        return factor_product(self.s_out, SU, SV, self.s_in)

    def latent_magnitudes(self, W: Tensor) -> dict[str, Tensor]:
        """Relative magnitudes (as `binllm.methods.trainable` seeds latent signs) of u (rows, r)
        and v (cols, r) for the full-precision W (rows, cols): each factor's least-squares
        real value given the other's signs and the scales, W' = diag(s_out)⁻¹ W diag(s_in)⁻¹,

            U* = W' S_V (S_Vᵀ S_V)⁻¹,   V* = W'ᵀ S_U (S_Uᵀ S_U)⁻¹,

        taken along the stored sign (S ⊙ U*, at least 1e-3: a sign the fit disagrees with is
        the first to flip) and divided by its row's mean |U*|."""
        SU = self.u.to(torch.float32) * 2 - 1
        SV = self.v.to(torch.float32) * 2 - 1
        inv_out = torch.where(self.s_out != 0, 1 / self.s_out, torch.zeros_like(self.s_out))
        inv_in = torch.where(self.s_in != 0, 1 / self.s_in, torch.zeros_like(self.s_in))
        Wp = W.to(torch.float32) * inv_out[:, None] * inv_in[None, :]  # (rows, cols)
        eye = torch.eye(self.rank, device=W.device)

        def along(S: Tensor, M: Tensor, S_other: Tensor) -> Tensor:  # (n, r)
            G = S_other.T @ S_other + 1e-3 * S_other.shape[0] * eye
            X = torch.linalg.solve(G, (M @ S_other).T).T  # least-squares factor
            m = (S * X) / X.abs().mean(1, keepdim=True).clamp_min(1e-12)
            return m.clamp_min(1e-3)

        return {"u": along(SU, Wp, SV), "v": along(SV, Wp.T, SU)}

    def paper_bits(self) -> float:
        """Sign bits per weight, r·(rows + cols) / (rows·cols), as the binarization papers
        count a sign plane (the scales are not counted; `stored_bits` counts them)."""
        rows, cols = self.shape
        return self.rank * (rows + cols) / (rows * cols)

    def stored_bits(self) -> int:
        """Every bit the packed form stores (`binllm.packed.formats`, format "factor")."""
        rows, cols = self.shape
        return factor_bits(rows, cols, self.rank, self.scale_dtype)
