"""Perplexity with the GPTQ protocol.

Protocol (GPTQ's evaluation, which all three papers use): the test text is one token stream; it is
cut into n = ⌊N/seqlen⌋
non-overlapping windows (the remainder is dropped); every window is evaluated on its own
(no carried context); the loss of a window is the mean cross-entropy over its seqlen − 1
shifted positions, and ppl = exp(mean of the window losses). `max_windows` evaluates only
the first windows, for quick runs; the result says how many were used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BinllmError
from .data import DataError

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class ContextError(BinllmError, ValueError):
    """A window or a generation longer than the model's context."""


def config_context(config) -> int | None:
    """The context length (tokens) a model config (object or dict) declares; None if none."""
    for key in CONTEXT_KEYS:
        v = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_context(model: nn.Module, seqlen: int) -> None:
    """Refuse windows of `seqlen` tokens beyond the context `model`'s config declares."""
    ctx = config_context(getattr(model, "config", None))
    if ctx is not None and seqlen > ctx:
        raise ContextError(f"seqlen={seqlen} exceeds the model's context of {ctx} tokens; "
                           f"use seqlen={ctx} or less")


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    windows: int        # windows evaluated
    total_windows: int  # windows the full stream has
    seqlen: int


def eval_windows(tokens: Tensor, seqlen: int, max_windows: int | None = None
                 ) -> tuple[Tensor, int]:
    """The GPTQ protocol's windows (n, seqlen) of tokens (1, N): consecutive, non-overlapping,
    the first `max_windows` of them; and how many the full stream has."""
    total = tokens.numel() // seqlen
    if total == 0:
        raise DataError(f"the evaluation text has {tokens.numel()} tokens, fewer than one "
                         f"window of {seqlen}; use a smaller seqlen=")
    n = total if max_windows is None else min(total, max_windows)
    return tokens.reshape(-1)[: n * seqlen].reshape(n, seqlen), total


def window_losses(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean next-token loss (b,) of each window: logits (b, seqlen, vocab) of ids (b, seqlen)."""
    logits = logits.float()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           ids[:, 1:].reshape(-1), reduction="none")
    return loss.reshape(ids.shape[0], -1).mean(dim=1).cpu()


def from_losses(losses: list[Tensor], total: int, seqlen: int) -> Perplexity:
    """exp of the mean of the windows' losses (fp64), as the references compute it."""
    mean = torch.cat(losses).double().mean().item()
    return Perplexity(ppl=math.exp(mean), windows=sum(len(x) for x in losses),
                      total_windows=total, seqlen=seqlen)


def perplexity(model: nn.Module, tokens: Tensor, seqlen: int, *, max_windows: int | None = None,
               device: torch.device | str = "cpu", batch_size: int = 1,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """GPTQ-convention perplexity of `model` on tokens (1, N)."""
    check_context(model, seqlen)
    windows, total = eval_windows(tokens, seqlen, max_windows)  # (n, seqlen)
    n = windows.shape[0]
    losses = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                ids = windows[i:i + batch_size].to(device)  # (b, seqlen)
                losses.append(window_losses(model(ids, use_cache=False).logits, ids))
                if progress:
                    progress(min(i + batch_size, n), n)
    finally:
        model.train(was_training)
    return from_losses(losses, total, seqlen)
