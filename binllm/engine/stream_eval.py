"""Perplexity computed layer by layer: every window's hidden states carried from one decoder
layer to the next, instead of one forward of the whole model per window.

    model, ckpt = open_streaming(DIR)          # skeleton: decoder layers on meta
    res = streamed_perplexity(model, ckpt, tokens, seqlen, max_windows=40)
    res = packed_perplexity(binarized_model, tokens, seqlen, max_windows=40)

Two sources of layers share the one loop (`layerwise_perplexity`):

- `StreamedLayers`: the dense checkpoint's decoder layer i is read from the shards, run on
  every window, and sent back to the meta device; at most one dense decoder layer is in memory.
- `ResidentLayers`: the layers are in memory (a binarized model); while layer i runs on the
  windows, its BinaryLinears hold their weight dequantized (`BinaryLinear.hold_dense`), so
  each linear is unpacked once per pass instead of once per window, and computes as nn.Linear
  does: bit for bit the reference forward, at the dense model's speed (layers asked for the
  int8 prefill compute in int8 instead, `BinaryLinear.hold_dense`).

The windows and the loss are those of `binllm.evaluation.perplexity.perplexity` (GPTQ
protocol, one window per forward call). The last layer's outputs go through the model's own
tail (final norm, lm_head, whatever the model does after its layers) by one more forward whose
decoder layers are stand-ins replaying them, so nothing model-specific is written here. The
hidden states of a group of windows are held (windows × seqlen × hidden in the model's dtype,
twice: a layer's inputs and outputs), as in the references' layer-wise evaluation, but at
most `max_hidden_bytes` of them (default: a quarter of the available memory): more windows
than that are evaluated in groups, each running every layer again. Each window runs the same
layer calls as the whole model's forward would, so the result equals the whole-model
perplexity whatever the grouping.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..packed.layers import BinaryLinear
from ..evaluation.perplexity import (Perplexity, check_context, eval_windows, from_losses,
                                      window_losses)
from .walker import (move_outside_layers, to_device, calibration_context, capture_layer_inputs,
                     find_decoder_layers, outside_modules)


class _Replay(nn.Module):
    """Stands in for a decoder layer: passes hidden states on, or (last) returns the stored
    output of the current window, shaped as the real layer returned it."""

    def __init__(self, outputs: list[Tensor] | None, as_tuple: bool, current: list[int]):
        super().__init__()
        self.outputs, self.as_tuple, self.current = outputs, as_tuple, current

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any):
        h = hidden_states if self.outputs is None else self.outputs[self.current[0]]
        return (h,) if self.as_tuple else h


class StreamedLayers:
    """Decoder layers read from the dense checkpoint `ckpt` into a skeleton, one at a time."""

    def __init__(self, ckpt: Any):
        from .stream import LayerStream

        self.stream = LayerStream(ckpt, None, keep_packed=False)

    def enter(self, i: int, path: str, layer: nn.Module, device) -> None:
        self.stream.load(i, path, layer)
        layer.to(device)

    def exit(self, layer: nn.Module) -> None:
        layer.to("meta")


class ResidentLayers:
    """Decoder layers already in memory; a layer's BinaryLinears hold their dense weight for as
    long as the layer runs (one unpack per linear and pass)."""

    def enter(self, i: int, path: str, layer: nn.Module, device) -> None:
        for m in _binary_linears(layer):
            m.hold_dense(True)

    def exit(self, layer: nn.Module) -> None:
        for m in _binary_linears(layer):
            m.hold_dense(False)


def _binary_linears(module: nn.Module) -> list[BinaryLinear]:
    return [m for m in module.modules() if isinstance(m, BinaryLinear)]


def has_binary_linears(model: nn.Module) -> bool:
    return any(isinstance(m, BinaryLinear) for m in model.modules())


def streamed_perplexity(model: nn.Module, ckpt: Any, tokens: Tensor, seqlen: int,
                        **kwargs) -> Perplexity:
    """GPTQ-convention perplexity of the dense checkpoint `ckpt` on tokens (1, N), its decoder
    layers read one at a time into the skeleton `model` (from `open_streaming`); keyword
    arguments as `layerwise_perplexity`."""
    return layerwise_perplexity(model, StreamedLayers(ckpt), tokens, seqlen, **kwargs)


def packed_perplexity(model: nn.Module, tokens: Tensor, seqlen: int, **kwargs) -> Perplexity:
    """GPTQ-convention perplexity of a model in memory whose linears are BinaryLinears, each
    dequantized once per pass (module docstring); equal to `perplexity(model, …)` on the
    reference forward. Keyword arguments as `layerwise_perplexity`."""
    return layerwise_perplexity(model, ResidentLayers(), tokens, seqlen, **kwargs)


def layerwise_perplexity(model: nn.Module, source, tokens: Tensor, seqlen: int, *,
                         max_windows: int | None = None, device: torch.device | str = "cpu",
                         progress=None, max_hidden_bytes: int | None = None) -> Perplexity:
    """GPTQ-convention perplexity of `model` on tokens (1, N), layer by layer, its decoder
    layers given by `source` (`StreamedLayers` or `ResidentLayers`).
    max_hidden_bytes: the hidden states held at once (windows beyond it: another pass)."""
    check_context(model, seqlen)
    windows, total = eval_windows(tokens, seqlen, max_windows)  # (n, seqlen)
    batches = [windows[i:i + 1] for i in range(windows.shape[0])]  # (1, seqlen) each
    group = windows_per_pass(model, seqlen, max_hidden_bytes, device)
    passes = [batches[i:i + group] for i in range(0, len(batches), group)]
    losses = []
    for k, part in enumerate(passes):
        step = None if progress is None else (
            lambda done, n, k=k: progress(k * n + done, len(passes) * n))
        losses += _pass_losses(model, source, part, device, step)
    return from_losses(losses, total, seqlen)


def windows_per_pass(model: nn.Module, seqlen: int, max_hidden_bytes: int | None,
                     device: torch.device | str = "cpu") -> int:
    """How many windows' hidden states (a layer's inputs and outputs) fit max_hidden_bytes
    (None: a quarter of what `device` has available; at least one window)."""
    from ..preflight import available_memory, hidden_width

    if max_hidden_bytes is None:
        avail = available_memory(device)
        if avail is None:
            return 1 << 30
        max_hidden_bytes = avail // 4
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    itemsize = p.element_size() if p is not None else 4
    return max(1, int(max_hidden_bytes // (2 * seqlen * hidden_width(model) * itemsize)))


def _pass_losses(model: nn.Module, source, batches: list[Tensor], device,
                 progress) -> list[Tensor]:
    """Per-window losses of `batches`, every decoder layer entered once."""
    path, layers = find_decoder_layers(model)
    as_tuple = False
    with calibration_context(model):
        inputs = capture_layer_inputs(model, layers, batches, device)
        hidden = inputs.hidden
        for i, layer in enumerate(layers):
            source.enter(i, f"{path}.{i}", layer, device)
            try:
                out = []
                for h, kw in zip(hidden, inputs.kwargs):
                    raw = layer(h.to(device), **to_device(kw, device))
                    as_tuple = isinstance(raw, (tuple, list))
                    out.append(raw[0] if as_tuple else raw)  # as run_layer reduces it
            finally:
                source.exit(layer)
            hidden = out
            if progress:
                progress(i + 1, len(layers))
        return _tail_losses(model, layers, batches, hidden, as_tuple, device)


def _tail_losses(model: nn.Module, layers: nn.ModuleList, batches: list[Tensor],
                 last: list[Tensor], as_tuple: bool, device) -> list[Tensor]:
    """Per-window losses from the last layer's outputs, through the model's own tail."""
    current = [0]
    real = list(layers)
    for j in range(len(layers)):
        layers[j] = _Replay(last if j == len(layers) - 1 else None, as_tuple, current)
    moved = move_outside_layers(model, layers, device)
    # a packed lm_head, or the packed table a TiedHead reads: unpacked once for every window
    held = [m for m in outside_modules(model, layers) if isinstance(m, BinaryLinear)]
    for m in held:
        m.hold_dense(True)
    losses = []
    try:
        for current[0], ids in enumerate(batches):
            ids = ids.to(device)
            losses.append(window_losses(model(ids, use_cache=False).logits, ids))
    finally:
        for m in held:
            m.hold_dense(False)
        for j, module in enumerate(real):
            layers[j] = module
        move_outside_layers(model, layers, "cpu", only=moved)
    return losses
