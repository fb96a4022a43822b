"""Hessian of the layer-wise reconstruction loss and its inverse Cholesky factor.

For a linear layer with inputs X_n (tokens × d) the proxy loss ‖WX − ŴX‖² has Hessian

    H = 2/N · Σ_n X_nᵀ X_n          (d, d), fp32, N = number of calibration samples

(GPTQ / OBS convention, identical in the three reference codebases). We sum in fp32 with a
sample count and divide once, which equals the references' running mean up to rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import BinllmError

log = logging.getLogger(__name__)


class HessianNotPositiveDefinite(BinllmError, RuntimeError):
    """Raised when H stays singular after every damping retry."""


class HessianAccumulator:
    """Sum of XᵀX in fp32 plus the number of samples; `H` divides once.

    A "sample" is one leading-dimension entry of the input: a (batch, tokens, d) input adds
    `batch` samples, matching the references, which feed one sequence per forward call.
    """

    def __init__(self, d: int, device: torch.device | str = "cpu"):
        self.XtX = torch.zeros(d, d, dtype=torch.float32, device=device)  # (d, d)
        self.nsamples = 0
        self.final = False  # finalize() turned XtX into H

    def add_batch(self, X: Tensor) -> None:
        if self.final:
            raise RuntimeError("this accumulator was finalized: its XtX already holds H")
        n = X.shape[0] if X.dim() == 3 else 1
        X = X.reshape(-1, X.shape[-1]).to(self.XtX.device, torch.float32)  # (tokens, d)
        self.XtX.addmm_(X.T, X)
        self.nsamples += n

    @property
    def H(self) -> Tensor:
        """2/N · XᵀX, a new tensor (the accumulator can go on); `finalize` avoids the copy."""
        if self.final:
            return self.XtX
        return self.XtX * self._scale()

    def finalize(self) -> Tensor:
        """H computed in place of XᵀX (bit-identical to `H`, without a second d × d buffer);
        the accumulator takes no more batches, and later calls return the same tensor."""
        if not self.final:
            self.XtX.mul_(self._scale())  # the same fp32 product as `XtX * (2 / N)`
            self.final = True
        return self.XtX

    def _scale(self) -> float:
        if self.nsamples == 0:
            raise ValueError("no calibration inputs reached this layer; check the calibration data")
        return 2.0 / self.nsamples


@dataclass(frozen=True)
class InverseCholesky:
    U: Tensor          # (d, d) upper factor with H_damped⁻¹ = Uᵀ U
    H: Tensor          # (d, d) H after the dead-column fix, before damping (the caller's
    #                    tensor itself when it is fp32 and has no dead column)
    dead: Tensor       # (d,) bool, columns that never saw a non-zero input
    percdamp: float    # the damping fraction finally used


def inverse_cholesky(H: Tensor, percdamp: float = 0.01, retries: int = 4,
                     name: str = "") -> InverseCholesky:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = percdamp · mean(diag H).

    Dead inputs (H_jj = 0) get H_jj = 1 (the caller zeroes those weight columns). When the
    factorisation fails, percdamp is multiplied by 10 up to `retries` times, logging the
    layer name, before giving up with advice.
    """
    dead = torch.diag(H) == 0  # (d,)
    if dead.any() or H.dtype != torch.float32:  # otherwise H is left as it is: no copy
        H = H.to(torch.float32, copy=True)  # (d, d)
        H[dead, dead] = 1.0
    d = H.shape[0]
    eye = torch.arange(d, device=H.device)
    # at most three d × d buffers besides H at a time (each freed once the next exists)
    for attempt in range(retries + 1):
        Hd = H.clone()
        Hd[eye, eye] += percdamp * torch.mean(torch.diag(H))
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info == 0:
            Hinv = torch.cholesky_inverse(L)  # (d, d)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0 and torch.isfinite(U).all():
                return InverseCholesky(U=U, H=H, dead=dead, percdamp=percdamp)
            del U
        if attempt < retries:
            log.warning("%s: Hessian not positive definite with percdamp=%g; retrying with %g",
                        name or "layer", percdamp, percdamp * 10)
            percdamp *= 10
    raise HessianNotPositiveDefinite(
        f"{name or 'layer'}: the Hessian is not positive definite even with percdamp={percdamp:g}. "
        "Use more calibration windows (nsamples=) or a larger percdamp=.")
