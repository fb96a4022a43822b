"""The PB-LLM QAT training loop (PB-LLM's QAT) for a model prepared by `binllm.qat`.

Plain PyTorch: AdamW (HF Trainer's defaults: betas 0.9/0.999, eps 1e-8, no weight decay,
gradient clipping at 1.0), linear warm-up then cosine decay, gradient accumulation, a step
budget, bf16 autocast on CUDA devices that support it, optional gradient checkpointing,
periodic perplexity and atomic, resumable checkpoints (trainable state, optimizer, scheduler,
step, RNG). The windows of optimizer step t are drawn from the training stream with a
generator seeded by (seed, t), so a resumed run sees exactly the data of an uninterrupted one
and, on deterministic kernels, ends with the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import atomic_write
from ..evaluation.perplexity import perplexity
from .model import QATConfig, QATError, qat_modules

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1

# fields that change the trajectory: a checkpoint only resumes a run that agrees on them
_TRAJECTORY = ("salient_fraction", "high_bit", "include_lm_head", "steps", "batch_size",
               "grad_accum", "seqlen", "lr", "weight_decay", "warmup_ratio", "max_grad_norm",
               "seed")


@dataclass(frozen=True)
class StepInfo:
    step: int            # optimizer steps done
    steps: int
    loss: float          # mean training loss of this step's windows
    lr: float
    evals: dict[str, float] | None  # perplexities when evaluated at this step
    seconds: float       # wall time of this run so far


@dataclass
class QATResult:
    start_step: int
    step: int
    losses: list[float] = field(default_factory=list)  # per step, from step 1 (incl. resumed)
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", name: ppl, …}
    seconds: float = 0.0
    trainable_parameters: int = 0
    bf16: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _CosineWarmup:
    """LR factor: linear warm-up to 1, then cosine decay to 0 at `total` (HF's schedule)."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def training_windows(tokens: Tensor, config: QATConfig, step: int) -> Tensor:
    """The (grad_accum, batch_size, seqlen) windows of optimizer step `step` (0-based)."""
    flat = tokens.reshape(-1)  # (N,)
    g = torch.Generator().manual_seed((config.seed << 32) + step)
    starts = torch.randint(0, flat.numel() - config.seqlen + 1,
                           (config.grad_accum, config.batch_size), generator=g)
    return flat[starts[..., None] + torch.arange(config.seqlen)]  # (accum, batch, seqlen)


def _use_bf16(config: QATConfig, device: torch.device) -> bool:
    if config.bf16 is not None:
        return config.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, scheduler,
                    config: QATConfig, step: int, losses: list[float], evals: list) -> None:
    """Write the resumable state to `path` atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {"format": "binllm-qat", "version": CHECKPOINT_VERSION, "step": step,
             "config": dataclasses.asdict(config),
             "modules": {n: m.state_dict() for n, m in qat_modules(model).items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng, "losses": list(losses), "evals": list(evals)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler, config) -> dict:
    if not Path(path).is_file():
        raise QATError(f"checkpoint {path} not found; drop resume= to start a new run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: pickle/zip errors of many kinds
        raise QATError(f"cannot read checkpoint {path} ({type(e).__name__}); it is damaged or "
                       "not a binllm QAT checkpoint: start a new run") from None
    if (not isinstance(state, dict) or state.get("format") != "binllm-qat"
            or state.get("version") != CHECKPOINT_VERSION):
        raise QATError(f"{path} is not a binllm QAT checkpoint of version {CHECKPOINT_VERSION}")
    diff = [k for k in _TRAJECTORY if state["config"].get(k) != getattr(config, k)]
    if diff:
        raise QATError(f"{path} was written with different settings ({', '.join(diff)}); "
                       "resume with the same QAT settings or start a new run")
    mods = qat_modules(model)
    if set(state["modules"]) != set(mods):
        raise QATError(f"{path} holds other linears than this model; resume on the same model")
    for name, m in mods.items():
        m.load_state_dict(state["modules"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def _checkpointing(model: nn.Module, on: bool) -> None:
    """HF activation (gradient) checkpointing, non-reentrant; the pre-5.x name as fallback."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def train_qat(model: nn.Module, train_tokens: Tensor, config: QATConfig, *,
              eval_sets: Mapping[str, Tensor] | None = None, device: torch.device | str = "cpu",
              resume: str | os.PathLike | None = None,
              callback: Callable[[StepInfo], None] | None = None) -> QATResult:
    """Train a model prepared with `prepare_qat` on windows of `train_tokens` (1, N).

    eval_sets: token streams (1, M) by name for the periodic perplexity (first
    `eval_windows` windows of seqlen). resume: a checkpoint written by a run with the same
    settings; training continues from its step. `callback` gets a StepInfo after every step.
    """
    mods = qat_modules(model)
    params = [p for m in mods.values() for p in m.parameters() if p.requires_grad]
    if not params:
        raise QATError("the model has no trainable PartialBinaryLinear; call prepare_qat first")
    n_tokens = train_tokens.numel()
    if n_tokens < config.batch_size * config.seqlen:
        raise QATError(f"the training text has {n_tokens} tokens, fewer than one batch of "
                       f"{config.batch_size} × {config.seqlen}; use more text, a smaller "
                       "batch size or a shorter seqlen")
    device = torch.device(device)
    bf16 = _use_bf16(config, device)
    model.to(device)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _CosineWarmup(config.warmup_steps, config.steps))
    result = QATResult(start_step=0, step=0, bf16=bf16,
                       trainable_parameters=sum(p.numel() for p in params))
    if resume is not None:
        state = _load_checkpoint(resume, model, optimizer, scheduler, config)
        result.start_step = result.step = state["step"]
        result.losses, result.evals = list(state["losses"]), list(state["evals"])
    if config.gradient_checkpointing:
        _checkpointing(model, True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    start = time.perf_counter()
    was_training = model.training
    model.train()
    try:
        for step in range(result.step, config.steps):
            optimizer.zero_grad(set_to_none=True)
            windows = training_windows(train_tokens, config, step)  # (accum, batch, seqlen)
            loss_sum = 0.0
            for ids in windows:
                ids = ids.to(device)
                with autocast:
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                (loss / config.grad_accum).backward()
                loss_sum += loss.item()
            loss_step = loss_sum / config.grad_accum
            if not math.isfinite(loss_step):
                raise QATError(f"the training loss became {loss_step} at step {step + 1}; "
                               "lower the learning rate or disable bf16")
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            result.step = step + 1
            result.losses.append(loss_step)
            evals = None
            last = result.step == config.steps
            if eval_sets and (last or (config.eval_every and result.step % config.eval_every == 0)):
                evals = evaluate_sets(model, eval_sets, config.seqlen, config.eval_windows, device)
                result.evals.append({"step": result.step, **evals})
            if config.checkpoint_path and config.checkpoint_every and (
                    last or result.step % config.checkpoint_every == 0):
                save_checkpoint(config.checkpoint_path, model, optimizer, scheduler, config,
                                result.step, result.losses, result.evals)
            result.seconds = time.perf_counter() - start
            if callback:
                callback(StepInfo(result.step, config.steps, loss_step, lr, evals, result.seconds))
    finally:
        model.train(was_training)
        if config.gradient_checkpointing:
            _checkpointing(model, False)
    log.info("QAT: %d steps in %.1f s, final loss %.4f", result.step - result.start_step,
             result.seconds, result.losses[-1] if result.losses else float("nan"))
    return result


def evaluate_sets(model: nn.Module, eval_sets: Mapping[str, Tensor], seqlen: int,
                  max_windows: int | None, device) -> dict[str, float]:
    """Perplexity (GPTQ protocol, first `max_windows` windows) on each named token stream."""
    return {name: perplexity(model, tokens, seqlen, max_windows=max_windows, device=device).ppl
            for name, tokens in eval_sets.items()}
