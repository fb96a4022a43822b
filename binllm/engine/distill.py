"""Distillation of a quantized model's scales against the full-precision model's logits.

After every decoder layer is quantized (and refined block by block), the continuous
quantization parameters of all linears at once (their codes' scales and means; latent signs
with sign_lr > 0) are trained to minimise, over the training windows (`distill_windows`: the
calibration windows, text sampled from the FP model, or both),

    KL(q ‖ p_Q) = Σ_tokens Σ_{v ∈ top-k} q_v (log q_v − log p_Q,v) / tokens

where q is the full-precision model's next-token distribution restricted to its k most
likely tokens (renormalised) and p_Q the quantized model's full softmax, read at those
tokens. This is the scales-only end-to-end stage of NanoQuant (ICML 2026) and of OneBit's
and PV-tuning's final fine-tuning: the layer-wise objective of `binllm.engine.refine` leaves
errors that only show at the output, and the output is what the user sees.

The teacher's top-k (`teacher_targets`) is taken before the first layer is quantized, so the
full-precision model need not be kept: k × (2 + 4) bytes per token. The codes' layout does
not change (stored bits are the same), the weights the training sees are the codes' own
`dequantize()`, and the trained codes are kept only if their loss on the training windows,
with the scales rounded to their storage precision, is not higher than before.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..methods.trainable import TrainableCodes
from .config import DistillConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherTargets:
    """The full-precision model's top-k next-token log-probabilities of one window."""

    logprobs: Tensor  # (batch, seqlen, k) fp16, renormalised over the k tokens
    tokens: Tensor    # (batch, seqlen, k) int32 vocabulary ids


@dataclass(frozen=True)
class DistillReport:
    """What distillation did: the loss (top-k KL, nats per token) on its training windows."""

    loss_before: float
    loss_after: float
    kept: bool          # True: the distilled codes are kept (their loss is not higher)
    flipped: int        # signs that differ from the codes before distillation
    steps: int
    seconds: float


def _logits(model: nn.Module, ids: Tensor, weights: dict[str, Tensor] | None = None) -> Tensor:
    """(batch, seqlen, vocab) logits of `model` on ids, with `weights` substituted."""
    out = functional_call(model, weights or {}, (ids,), {"use_cache": False})
    return out.logits if hasattr(out, "logits") else out[0]


def teacher_targets(model: nn.Module, windows: list[Tensor], k: int,
                    device: torch.device | str = "cpu") -> list[TeacherTargets]:
    """The top-k of `model`'s next-token distribution on each window (ids (batch, seqlen))."""
    out = []
    with torch.no_grad():
        for ids in windows:
            logits = _logits(model, ids.to(device)).float()  # (batch, seqlen, vocab)
            top, idx = logits.topk(min(k, logits.shape[-1]), dim=-1)
            out.append(TeacherTargets(logprobs=top.log_softmax(-1).half().cpu(),
                                      tokens=idx.int().cpu()))
            del logits
    return out


def teacher_samples(model: nn.Module, n: int, seqlen: int, seed: int = 0, batch: int = 32,
                    device: torch.device | str = "cpu") -> Tensor:
    """(n, seqlen) token ids sampled from `model`: the first token uniform over the
    vocabulary, every next one drawn from the model's full next-token distribution
    (temperature 1), with the key/value cache of the model's own generation path.

    This follows LLM-QAT's data-free distillation (which takes the most likely token for the
    first few steps): what the model itself says, so the training it feeds is not fitted to
    one corpus.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    # transformers >= 5 names the key/value cache `cache`, transformers < 5 `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"
    out = []
    with torch.no_grad():
        for b in range(0, n, batch):
            ids = torch.randint(vocab, (min(batch, n - b), 1), generator=g)
            step = model(ids.to(device), use_cache=True)
            for _ in range(seqlen - 1):
                probs = step.logits[:, -1].float().softmax(-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=g)  # (batch, 1)
                ids = torch.cat([ids, nxt], dim=1)
                step = model(nxt.to(device), use_cache=True, **{key: getattr(step, key)})
            out.append(ids)
            del step
    return torch.cat(out)


def distill_windows(model: nn.Module, calibration: list[Tensor], config: DistillConfig,
                    seed: int = 0, device: torch.device | str = "cpu") -> list[Tensor]:
    """The windows (batch, seqlen) distillation trains on, by config.data: the first
    config.windows calibration windows (0: all), text sampled from `model` with as many
    tokens or config.sample_windows calibration windows' worth (sequences of sample_len
    tokens, capped at the calibration length, grouped so that a window holds at most as many
    tokens as a calibration window), or both."""
    calibration = list(calibration[:config.windows or None])
    if config.data == "calib":
        return calibration
    seqlen = max(w.shape[-1] for w in calibration)
    length = min(config.sample_len, seqlen)
    tokens = config.sample_windows * max(w.numel() for w in calibration) \
        if config.sample_windows else sum(w.numel() for w in calibration)
    n = tokens // length
    t0 = time.perf_counter()
    sampled = list(teacher_samples(model, n, length, seed, device=device).split(seqlen // length))
    log.info("distill: sampled %d sequences of %d tokens from the FP model in %.1f s",
             n, length, time.perf_counter() - t0)
    return sampled if config.data == "sampled" else calibration + sampled


def topk_kl(logits: Tensor, target: TeacherTargets) -> Tensor:
    """Mean over tokens of KL(q ‖ p) on the teacher's top-k; logits (batch, seqlen, vocab)."""
    logp = logits.float().log_softmax(-1)
    logq = target.logprobs.to(logits.device, torch.float32)
    logp_k = logp.gather(-1, target.tokens.to(logits.device, torch.int64))
    return (logq.exp() * (logq - logp_k)).sum(-1).mean()


def distill_codes(model: nn.Module, codes: dict[str, Any], windows: list[Tensor],
                  targets: list[TeacherTargets], config: DistillConfig,
                  device: torch.device | str = "cpu") -> tuple[dict[str, Any], DistillReport]:
    """Train the continuous fields of `codes` (full linear name -> stored codes) so that
    `model`, computing with their weights, matches `targets` on `windows`.

    model: the quantized model; the linears named in `codes` hold their codes' weights and
    get the kept codes' weights on return. Returns (codes to keep, report).
    """
    t0 = time.perf_counter()
    params = dict(model.named_parameters())
    dtypes = {name: params[f"{name}.weight"].dtype for name in codes}
    train = {name: TrainableCodes(c, params[f"{name}.weight"].detach(),
                                  train_signs=config.sign_lr > 0)
             for name, c in codes.items()}
    before = _loss(model, {nm: c.dequantize() for nm, c in codes.items()}, dtypes, windows,
                   targets, device)
    opt = torch.optim.Adam([g for t in train.values()
                            for g in t.param_groups(config.lr, config.sign_lr)])
    steps = config.epochs * len(windows)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.Generator().manual_seed(0)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                              enabled=config.autocast == "bfloat16")
    wanted = {name: p.requires_grad for name, p in params.items()}
    model.requires_grad_(False)  # only the codes' fields are trained
    try:
        with torch.enable_grad():
            for epoch in range(config.epochs):
                total = 0.0
                for j in torch.randperm(len(windows), generator=order).tolist():
                    weights = {f"{nm}.weight": t.weight().to(device, dtypes[nm])
                               for nm, t in train.items()}
                    with autocast:
                        logits = _logits(model, windows[j].to(device), weights)
                    loss = topk_kl(logits, targets[j])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += loss.item()
                    del logits, loss, weights
                log.info("distill epoch %d/%d: loss %.4f", epoch + 1, config.epochs,
                         total / len(windows))
    finally:
        for name, p in params.items():
            p.requires_grad_(wanted[name])
    distilled = {nm: t.codes() for nm, t in train.items()}
    after = _loss(model, {nm: c.dequantize() for nm, c in distilled.items()}, dtypes,
                  windows, targets, device)
    kept = after <= before
    keep = distilled if kept else codes
    for nm, c in keep.items():
        p = params[f"{nm}.weight"]
        p.data = c.dequantize().to(device=p.device, dtype=p.dtype)
    rep = DistillReport(loss_before=before, loss_after=after, kept=kept,
                        flipped=sum(t.flipped() for t in train.values()) if kept else 0,
                        steps=steps, seconds=time.perf_counter() - t0)
    log.info("distilled: top-%d KL %.4f -> %.4f (%s), %d signs flipped, %.1f s", config.topk,
             before, after, "kept" if kept else "discarded", rep.flipped, rep.seconds)
    return keep, rep


def _loss(model: nn.Module, Q: dict[str, Tensor], dtypes: dict[str, torch.dtype],
          windows: list[Tensor], targets: list[TeacherTargets],
          device: torch.device | str) -> float:
    """Mean over windows of the top-k KL with weights Q (linear name -> Ŵ)."""
    weights = {f"{nm}.weight": w.to(device, dtypes[nm]) for nm, w in Q.items()}
    with torch.no_grad():
        return sum(float(topk_kl(_logits(model, ids.to(device), weights), t))
                   for ids, t in zip(windows, targets)) / max(len(windows), 1)
