"""PB-LLM quantization-aware training (PB-LLM's QAT): frozen salient weights, α·sign(w) rest.

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
(and biases) of these linears train; everything else is frozen.

Flow: `prepare_qat` (swap linears, magnitude or PTQ masks) → `binllm.qat.train.train_qat`
(the training loop) → `finalize_qat` (plain nn.Linear weights + codes for the packed format)
or `qat_codes` / `to_plain_linears`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.codes import PartialBinaryCodes, to_storage
from ..methods.gptq import minmax_params, quantize_uniform
from ..engine.walker import find_decoder_layers, find_linears
from ..errors import BinllmError

log = logging.getLogger(__name__)


class QATError(BinllmError, ValueError):
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
        self.bias = (nn.Parameter(bias.detach().to(torch.float32).clone())
                     if bias is not None else None)
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
            (0 <= self.warmup_ratio < 1,
             f"warmup_ratio={self.warmup_ratio}: use a value in [0, 1)"),
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
    if config.include_lm_head and getattr(model.config, "tie_word_embeddings", False):
        log.info("binarizing the LM head unties it from the (full-precision) input embedding")
        model.config.tie_word_embeddings = False
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


def ptq_masks(model: nn.Module, calibration: list[Tensor], config: QATConfig, *,
              device: torch.device | str = "cpu", **pbllm_args: Any) -> dict[str, Tensor]:
    """Salient masks from a PB-LLM PTQ run (the reference's `xnor_outlier_hessian`).

    Binarizes a deep copy of `model` (memory: one extra model) with `pbllm` at the same
    salient fraction and high_bit (Hessian saliency by default) and keeps each linear's mask.
    """
    from ..engine.binarize import binarize_model
    from ..engine.config import QuantizeConfig

    args = {"salient_fraction": config.salient_fraction, "high_bit": config.high_bit, **pbllm_args}
    report = binarize_model(copy.deepcopy(model), QuantizeConfig("pbllm", args), calibration,
                            device=device)
    return {name: codes.salient for name, codes in report.codes.items()}


def finalize_qat(model: nn.Module, config: QATConfig, mask: str = "magnitude"):
    """Write the trained weights back as plain nn.Linear; return a QuantizeReport with codes.

    The report (method "pbllm-qat", PartialBinaryCodes with μ = 0 per linear) is what
    `binllm.packed.checkpoint.save_binarized` packs; the model evaluates in memory as it is.
    """
    from ..engine.binarize import LinearReport, QuantizeReport

    codes = to_plain_linears(model)
    report = QuantizeReport(
        method="pbllm-qat",
        method_args={"salient_fraction": config.salient_fraction, "high_bit": config.high_bit,
                     "mask": mask, "include_lm_head": config.include_lm_head},
        config={"block_size": None, "percdamp": None, "feedback": None, "skip": [],
                "qat": dataclasses.asdict(config)})
    for name, c in codes.items():
        report.linears.append(LinearReport(
            name=name, shape=c.shape, loss=float("nan"), percdamp=None,
            paper_bits=c.paper_bits(), stored_bits=c.stored_bits() / c.signs.numel(), seconds=0.0))
    report.codes = codes
    return report
