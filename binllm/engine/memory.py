"""What layer-by-layer calibration holds in memory at once: the preflight's lower bound."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..preflight import gib, hidden_width
from .walker import UnsupportedArchitecture, find_decoder_layers, find_linears


@dataclass(frozen=True)
class CalibrationMemory:
    activations: int   # layer inputs and outputs of every calibration window
    hessians: int      # fp32 XᵀX of one decoder layer's linears
    detail: str

    @property
    def total(self) -> int:
        return self.activations + self.hessians


def calibration_memory(model: Any, nsamples: int, seqlen: int, *,
                       needs_hessian: bool = True) -> CalibrationMemory:
    """What layer-by-layer calibration holds at once (a lower bound).

    activations = 2 (a layer's inputs and its outputs) × nsamples × seqlen × hidden × dtype
    bytes, plus the rotary cos/sin and int64 position ids kept per window; Hessians = Σ
    in_features² × 4 over the widest decoder layer, counting the linears of one parent module
    with one input width once (q/k/v and gate/up read one tensor and share one H; o_proj,
    which shares its parent and width with q/k/v but not its input, is not counted: a lower
    bound, as a refusal must be).
    """
    from torch import nn

    itemsize = next(model.parameters()).element_size()
    hidden = hidden_width(model)
    cfg = getattr(model, "config", None)
    head_dim = (getattr(cfg, "head_dim", None)
                or hidden // max(1, getattr(cfg, "num_attention_heads", 1) or 1))
    per_window = seqlen * (2 * hidden + 2 * head_dim) * itemsize + seqlen * 8
    activations = nsamples * per_window
    hessians = 0
    try:
        _, layers = find_decoder_layers(model)
    except UnsupportedArchitecture:  # binarize_model says so in its own words
        layers = []
    if needs_hessian:
        hessians = max((sum(width ** 2 * 4 for _, width in {
            (name.rpartition(".")[0], m.in_features) for name, m in find_linears(layer).items()
            if isinstance(m, nn.Linear)}) for layer in layers), default=0)
    detail = (f"{gib(activations)} of activations: 2 × {nsamples} windows × {seqlen} tokens × "
              f"hidden {hidden} × {itemsize} bytes and their positions; {gib(hessians)} of "
              "Hessians")
    return CalibrationMemory(activations, hessians, detail)

