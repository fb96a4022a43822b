"""Checks run before any layer is quantized: finite weights, `skip` names that match."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ConfigError
from .walker import find_decoder_layers, find_linears
from ..errors import BinllmError


class NonFiniteWeights(BinllmError, ValueError):
    """A weight matrix holds NaN or Inf before quantization."""


class UnknownSkip(BinllmError, ValueError):
    """A `skip` name matches no linear of the decoder layers."""


FINITE_CHUNK = 1 << 24  # elements checked at a time (bounded temporary memory)


def check_finite(model: nn.Module) -> None:
    """Raise NonFiniteWeights naming the first parameter or buffer that holds NaN or Inf.

    Every tensor (embeddings, norms, LM head, every linear) is checked, in chunks, before
    any layer is touched.
    """
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not t.is_meta:  # meta: a streamed layer, checked when read
            refuse_non_finite(name, t)


def refuse_non_finite(name: str, t: Tensor) -> None:
    """Raise NonFiniteWeights naming `name` if `t` holds NaN or Inf (checked in chunks)."""
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), FINITE_CHUNK):
        if not torch.isfinite(flat[start:start + FINITE_CHUNK]).all():
            nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
            raise NonFiniteWeights(
                f"{name} holds {nan} NaN and {inf} Inf values (of {flat.numel()}); the "
                "checkpoint is corrupt or was saved after a diverged run: use another one")


def linear_names(model: nn.Module) -> list[str]:
    """Names of the linears inside the decoder layers, relative to a layer, in order."""
    _, layers = find_decoder_layers(model)
    names: dict[str, None] = {}
    for layer in layers:
        names.update(dict.fromkeys(find_linears(layer)))
    return list(names)


def skip_matches(name: str, skip: tuple[str, ...] | list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def binarized_names(model: nn.Module, skip: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Full names of the linears binarize_model will quantize (decoder linears minus skip)."""
    path, layers = find_decoder_layers(model)
    return [f"{path}.{i}.{n}" for i, layer in enumerate(layers) for n in find_linears(layer)
            if not skip_matches(n, skip)]


def check_skip(model: nn.Module, skip: tuple[str, ...] | list[str]) -> None:
    """Raise UnknownSkip when a skip name matches no linear of the decoder layers, and
    ConfigError when the names skip every linear (nothing would be binarized)."""
    names = linear_names(model)
    unknown = [s for s in skip if not any(skip_matches(n, [s]) for n in names)]
    if unknown:
        short = names[-1].rpartition(".")[2] if names else ""
        raise UnknownSkip(f"skip={','.join(unknown)} matches no linear of "
                          f"{type(model).__name__}'s decoder layers; they are "
                          f"{', '.join(names)} (a name or its last part, e.g. {short})")
    if skip and names and all(skip_matches(n, list(skip)) for n in names):
        raise ConfigError(f"skip={','.join(skip)} leaves no linear to binarize (the decoder "
                          f"layers hold {len(names)}); drop names from skip=")
