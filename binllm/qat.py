"""PB-LLM quantization-aware training (methods.md §2.5): frozen salient weights, α·sign(w) rest.

Every binarizable linear becomes a `PartialBinaryLinear` whose forward weight is

    Ŵ = where(salient, s·(q − z), α·B),   B = sign(W_latent) ∈ {−1, +1} (sign(0) = +1)
    α = ‖W_latent ⊙ ¬salient‖₁ / n_ns     (the paper's optimal scale α*, one scalar per matrix)

| symbol   | meaning                                                        | shape          |
|----------|----------------------------------------------------------------|----------------|
| W_latent | trainable latent weights (fp32)                                | (out, in)      |
| salient  | frozen salient mask (magnitude outliers or a PTQ mask)         | (out, in) bool |
| q, s, z  | frozen high-bit levels, per-row step and zero point            | (out, in), (out,) |
| alpha    | recomputed from W_latent at every forward, detached, fp16-rounded | scalar      |

The gradient reaches W_latent through the straight-through estimator (∂B/∂W = 1, so
∂L/∂W = α·∂L/∂Ŵ on non-salient positions and 0 on salient ones). Only the latent weights
(and biases) of these linears train; everything else is frozen. The loop is plain PyTorch:
AdamW, linear warm-up + cosine decay, gradient accumulation, bf16 autocast on CUDA when
supported, optional gradient checkpointing, periodic perplexity, atomic resumable checkpoints.
Training windows for step t are drawn with a generator seeded by (seed, t), so a resumed run
sees exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .evaluate import perplexity
from .methods.codes import PartialBinaryCodes, to_storage
from .methods.gptq import minmax_params, quantize_uniform
from .walker import find_decoder_layers, find_linears

log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1


class QATError(ValueError):
    """Bad QAT input: nothing to train, no steps, too little text, incompatible checkpoint."""


class _SignSTE(torch.autograd.Function):
    """B = sign(w) with sign(0) = +1; backward passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def outlier_mask(W: Tensor, fraction: float) -> Tensor:
    """PB-LLM's `xnor_outlier` mask: the fraction/2 smallest and largest *signed* values.

    lower = kthvalue(W, ⌊n·f/2⌋), upper = kthvalue(W, ⌊n·(1 − f/2)⌋) (1-based ranks);
    salient ⇔ W < lower or W > upper, as the reference does.
    """
    flat = W.detach().reshape(-1).float()
    n = flat.numel()
    k_lo, k_hi = int(n * fraction / 2 + 1e-9), int(n * (1 - fraction / 2) + 1e-9)
    lower = torch.kthvalue(flat, k_lo).values if k_lo >= 1 else flat.min() - 1
    upper = torch.kthvalue(flat, min(max(k_hi, 1), n)).values
    return (W < lower) | (W > upper)


class PartialBinaryLinear(nn.Module):
    """A linear layer trained as PB-LLM: frozen high-bit salient weights, α·sign(w) elsewhere."""

    def __init__(self, weight: Tensor, bias: Tensor | None, salient: Tensor, high_bit: int = 8):
        super().__init__()
        if salient.shape != weight.shape:
            raise QATError(f"salient mask of shape {tuple(salient.shape)} does not match the "
                           f"weight {tuple(weight.shape)}")
        W = weight.detach().to(torch.float32)
        self.out_features, self.in_features = W.shape
        self.high_bit = high_bit
        self.orig_dtype = weight.dtype
        self.weight = nn.Parameter(W.clone())  # latent weights
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        scale, zero = minmax_params(W, high_bit)  # (out,) each, over the full original row
        q = quantize_uniform(W, scale[:, None], zero[:, None], high_bit)  # (out, in)
        salient = salient.to(torch.bool)
        self.register_buffer("salient", salient)
        self.register_buffer("q_high", torch.where(salient, q, 0).to(torch.uint8))
        self.register_buffer("high_scale", scale)
        self.register_buffer("high_zero", zero)

    @classmethod
    def from_linear(cls, linear: nn.Linear, salient: Tensor, high_bit: int = 8):
        return cls(linear.weight, linear.bias, salient.to(linear.weight.device), high_bit)

    def salient_values(self) -> Tensor:
        return self.high_scale[:, None] * (self.q_high.to(torch.float32) - self.high_zero[:, None])

    def alpha(self) -> Tensor:
        """α = mean |W_latent| over the non-salient entries (detached, fp16-rounded scalar)."""
        keep = ~self.salient
        n = keep.sum().clamp(min=1)
        return to_storage((self.weight.detach().abs() * keep).sum() / n)

    def effective_weight(self) -> Tensor:
        low = self.alpha() * _SignSTE.apply(self.weight)  # (out, in)
        return torch.where(self.salient, self.salient_values(), low)

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.effective_weight().to(x.dtype), b)  # autocast recasts anyway

    def to_codes(self) -> PartialBinaryCodes:
        """The layer as PB-LLM codes: μ = 0, the per-tensor α repeated per row."""
        rows = self.out_features
        alpha = self.alpha().to(self.weight.device).expand(rows, 1).clone()  # (out, 1)
        return PartialBinaryCodes(
            salient=self.salient, q_high=self.q_high, high_scale=self.high_scale,
            high_zero=self.high_zero, signs=(self.weight.detach() >= 0) & ~self.salient,
            alpha=alpha, mu=torch.zeros_like(alpha), high_bit=self.high_bit,
            groupsize=self.in_features)

    def extra_repr(self) -> str:
        frac = self.salient.float().mean().item()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"salient={frac:.3f} at {self.high_bit} bit, bias={self.bias is not None}")


@dataclass(frozen=True)
class QATConfig:
    """One QAT run. Defaults follow the reference (lr 1e-4, warm-up 5 %, batch 2 × accum 4).

    salient_fraction  fraction kept at high_bit (PB-LLM's outlier_fraction)
    include_lm_head   also binarize the LM head (the reference replaces every nn.Linear)
    steps             optimizer steps (each = batch_size × grad_accum windows of seqlen)
    bf16              autocast to bfloat16; None = on CUDA devices that support it
    eval_every        perplexity every N steps (and at the end); 0 = only at the end
    checkpoint_every  write `checkpoint_path` every N steps (and at the end); 0 = never
    """

    salient_fraction: float = 0.1
    high_bit: int = 8
    include_lm_head: bool = False
    steps: int = 1000
    batch_size: int = 2
    grad_accum: int = 4
    seqlen: int = 2048
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    eval_every: int = 0
    eval_windows: int | None = 16
    checkpoint_every: int = 0
    checkpoint_path: str | None = None

    def __post_init__(self):
        checks = [
            (self.steps >= 1, f"steps={self.steps}: train for at least one step"),
            (self.batch_size >= 1 and self.grad_accum >= 1,
             "batch_size and grad_accum must be at least 1"),
            (self.seqlen >= 2, f"seqlen={self.seqlen}: use at least 2 tokens per window"),
            (self.lr > 0, f"lr={self.lr}: use a positive learning rate such as 1e-4"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio}: use a value in [0, 1)"),
            (0 <= self.salient_fraction < 1,
             f"salient_fraction={self.salient_fraction}: use a fraction in [0, 1), e.g. 0.1"),
            (1 <= self.high_bit <= 8, f"high_bit={self.high_bit}: use 1 to 8 bits"),
            (self.eval_every >= 0 and self.checkpoint_every >= 0,
             "eval_every and checkpoint_every must be 0 (off) or positive"),
            (not self.checkpoint_every or self.checkpoint_path,
             "checkpoint_every needs a checkpoint_path"),
        ]
        for ok, message in checks:
            if not ok:
                raise QATError(message)

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.steps)


# fields that change the trajectory: a checkpoint only resumes a run that agrees on them
_TRAJECTORY = ("salient_fraction", "high_bit", "include_lm_head", "steps", "batch_size",
               "grad_accum", "seqlen", "lr", "weight_decay", "warmup_ratio", "max_grad_norm",
               "seed")


def binarizable_linears(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
    """Every nn.Linear of the decoder layers (named as binarize_model does), plus the LM head."""
    path, layers = find_decoder_layers(model)
    out = {f"{path}.{i}.{n}": m for i, layer in enumerate(layers)
           for n, m in find_linears(layer).items()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if include_lm_head and isinstance(head, nn.Linear):
        out.update({n: m for n, m in model.named_modules() if m is head})
    return out


def prepare_qat(model: nn.Module, config: QATConfig,
                masks: Mapping[str, Any] | None = None) -> list[str]:
    """Swap the binarizable linears for PartialBinaryLinear in place; freeze everything else.

    masks: optional salient masks by linear name (bool tensors, or PB-LLM PTQ codes whose
    `.salient` is used — the reference's `xnor_outlier_hessian`); linears without one use
    the magnitude outlier mask. Returns the names of the swapped linears.
    """
    linears = binarizable_linears(model, config.include_lm_head)
    if not linears:
        raise QATError(f"{type(model).__name__} has no nn.Linear to train inside its decoder "
                       "layers (was prepare_qat already applied?)")
    for p in model.parameters():
        p.requires_grad_(False)
    masks = masks or {}
    for name, linear in linears.items():
        mask = masks.get(name)
        if masks and mask is None:
            log.warning("%s: no salient mask given; using the magnitude outlier mask", name)
        mask = getattr(mask, "salient", mask)
        if mask is None:
            mask = outlier_mask(linear.weight, config.salient_fraction)
        new = PartialBinaryLinear.from_linear(linear, mask, config.high_bit)
        _set_module(model, name, new)
    return list(linears)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def qat_modules(model: nn.Module) -> dict[str, PartialBinaryLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PartialBinaryLinear)}


def qat_codes(model: nn.Module) -> dict[str, PartialBinaryCodes]:
    """PartialBinaryCodes of every trained linear, by name (what the packed format stores)."""
    return {n: m.to_codes() for n, m in qat_modules(model).items()}


def to_plain_linears(model: nn.Module) -> dict[str, PartialBinaryCodes]:
    """Replace every PartialBinaryLinear by an nn.Linear holding its dequantized weights.

    The weights are cast back to the layer's original dtype. Returns the codes by name.
    """
    codes = {}
    for name, m in qat_modules(model).items():
        codes[name] = c = m.to_codes()
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                        device=m.weight.device, dtype=m.orig_dtype)
        lin.weight.data = c.dequantize().to(m.orig_dtype)
        if m.bias is not None:
            lin.bias.data = m.bias.detach().to(m.orig_dtype)
        lin.requires_grad_(False)
        _set_module(model, name, lin)
    return codes


# -- training ------------------------------------------------------------------------------
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
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler, config) -> dict:
    if not Path(path).is_file():
        raise QATError(f"checkpoint {path} not found; drop --resume to start a new run")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != "binllm-qat" or state.get("version") != CHECKPOINT_VERSION:
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
