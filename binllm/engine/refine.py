"""Block-wise refinement: train a quantized decoder layer against the full-precision one.

After a layer's linears are quantized by their method (the GPTQ-style pass), the layer's
continuous quantization parameters (scales, means and, where the codes have sign planes,
latent signs; `binllm.methods.trainable`) are trained with Adam to minimise

    Σ_windows ‖ layer_Q(X_Q) − layer_FP(X_FP) ‖² / numel      (loss="mse"; "token" divides
                                                              each token's error by its FP
                                                              output's mean square)

where X_Q is the quantized model's input stream (the layers before are already quantized
and refined, so accumulated error is corrected) and X_FP the full-precision model's stream,
carried alongside by `LayerRefiner`. This is the per-block objective of NanoQuant (ICML
2026) and of OneBit's and PV-tuning's block stages. The codes' layout (bitmaps, masks,
groups, levels) is fixed, so the stored bits do not change.

A refined layer never has a higher loss on its calibration windows than the unrefined one:
the loss of both is measured after training, with the scales at their storage precision, and
the better codes are kept.

Under torchrun (`dist`, `binllm.engine.distributed`) each rank trains on its share of the
windows and every step averages the ranks' gradients (data parallelism: W windows a step, as
many steps per epoch as the longest share), so the ranks' parameters stay equal; the losses
are means over every rank's windows, and the kept-or-discarded choice is the same on all.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..methods.trainable import TrainableCodes
from .config import RefineConfig
from .single_process import SingleProcess
from .walker import LayerInputs, map_tensors, run_layer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRefineReport:
    """What refining one decoder layer did (losses: the training loss on its windows)."""

    layer: int
    loss_before: float
    loss_after: float
    kept: bool          # True: the refined codes are kept (their loss is not higher)
    flipped: int        # signs that differ from the method's codes
    steps: int
    seconds: float


class LayerRefiner:
    """The refinement stage of the layer loop.

    `begin(layer, inputs)` runs before the layer is quantized: it keeps an fp32 copy of the
    full-precision layer and its output on the full-precision stream (the targets, and the
    next layer's full-precision inputs). `refine(i, layer, codes, inputs)` runs once the
    layer's codes are stored: it trains them on the quantized stream `inputs` and returns the
    codes to keep.
    """

    def __init__(self, config: RefineConfig, device: torch.device | str = "cpu",
                 dist: Any = None):
        self.config = config
        self.device = device
        self.dist = dist if dist is not None else SingleProcess()
        self.windows: range = range(0)  # this rank's training windows among its inputs
        self.fp_stream: list[Tensor] | None = None  # the FP model's inputs of the next layer
        self.fp_layer: nn.Module | None = None
        self.kwargs: list[dict[str, Any]] = []

    def begin(self, layer: nn.Module, inputs: LayerInputs) -> None:
        self.windows = self.dist.train_windows(len(inputs.hidden), self.config.windows)
        self.kwargs = [map_tensors(inputs.kwargs[k],
                                   lambda t: t.float() if t.is_floating_point() else t)
                       for k in self.windows]
        stream = self.fp_stream or [inputs.hidden[k].float() for k in self.windows]
        self.fp_layer = copy.deepcopy(layer).float().requires_grad_(False)
        with torch.no_grad():
            self.fp_stream = [run_layer(self.fp_layer, x.to(self.device), kw)
                              for x, kw in zip(stream, self.kwargs)]

    def refine(self, i: int, codes: dict[str, Any], inputs: LayerInputs
               ) -> tuple[dict[str, Any], LayerRefineReport]:
        """codes: name (relative to the layer) -> stored codes. Returns the codes to keep."""
        t0 = time.perf_counter()
        cfg = self.config
        layer = self.fp_layer
        linears = dict(layer.named_modules())
        X = [inputs.hidden[k].float() for k in self.windows]
        Y = self.fp_stream
        train = {n: TrainableCodes(c, linears[n].weight, train_signs=cfg.sign_lr > 0)
                 for n, c in codes.items()}
        before = self._loss({n: c.dequantize() for n, c in codes.items()}, X, Y)
        opt = torch.optim.Adam([g for t in train.values()
                                for g in t.param_groups(cfg.lr, cfg.sign_lr)])
        params = [q for g in opt.param_groups for q in g["params"]]
        per_epoch = int(self.dist.max_over_ranks(len(X), "refinement windows"))
        steps = cfg.epochs * per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        order = torch.Generator().manual_seed(i)
        with torch.enable_grad():
            for _ in range(cfg.epochs):
                mine = torch.randperm(len(X), generator=order).tolist()
                for s in range(per_epoch):  # every rank steps together
                    opt.zero_grad(set_to_none=True)
                    if s < len(mine):
                        j = mine[s]
                        weights = {f"{n}.weight": t.weight().to(self.device)
                                   for n, t in train.items()}
                        with self._autocast():
                            out = self._forward(weights, X[j], j)
                        self._error(out.float(), Y[j]).backward()
                    self.dist.average_gradients(params, stepped=s < len(mine))
                    opt.step()
                    sched.step()
        refined = {n: t.codes() for n, t in train.items()}
        after = self._loss({n: c.dequantize() for n, c in refined.items()}, X, Y)
        kept = after <= before
        rep = LayerRefineReport(layer=i, loss_before=before, loss_after=after, kept=kept,
                                flipped=sum(t.flipped() for t in train.values()) if kept else 0,
                                steps=steps, seconds=time.perf_counter() - t0)
        log.info("layer %d refined: %s loss %.4g -> %.4g (%s), %d signs flipped, %.1f s",
                 i, cfg.loss, before, after, "kept" if kept else "discarded", rep.flipped,
                 rep.seconds)
        self.fp_layer = None
        return (refined if kept else codes), rep

    def _autocast(self):
        """bf16 matmuls in the training steps when the config asks for them."""
        device_type = torch.device(self.device).type
        return torch.autocast(device_type, dtype=torch.bfloat16,
                              enabled=self.config.autocast == "bfloat16")

    def _forward(self, weights: dict[str, Tensor], x: Tensor, j: int) -> Tensor:
        out = functional_call(self.fp_layer, weights, (x.to(self.device),), self.kwargs[j])
        return out[0] if isinstance(out, (tuple, list)) else out

    def _loss(self, Q: dict[str, Tensor], X: list[Tensor], Y: list[Tensor]) -> float:
        """Mean over windows (every rank's) of the training loss with weights Q (name -> Ŵ)."""
        weights = {f"{n}.weight": w.to(self.device) for n, w in Q.items()}
        with torch.no_grad():
            total = sum(float(self._error(self._forward(weights, x, j), y))
                        for j, (x, y) in enumerate(zip(X, Y)))
        total, count = self.dist.sum_over_ranks([total, len(X)], "refinement loss")
        return total / max(count, 1)

    def _error(self, out: Tensor, y: Tensor) -> Tensor:
        """The training loss of one window: out, y (batch, seqlen, d)."""
        if self.config.loss == "token":  # each token's error relative to its FP output's size
            return ((out - y).pow(2).mean(-1) / y.pow(2).mean(-1).clamp_min(1e-12)).mean()
        return torch.nn.functional.mse_loss(out, y)
