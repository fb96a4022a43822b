"""The one configuration object of a binarization run (frozen, versioned, serialisable)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from ..errors import BinllmError
from ..methods import METHODS

FORMAT_VERSION = 1


class ConfigError(BinllmError, ValueError):
    """A QuantizeConfig field out of range (the CLI reports it in one line)."""


REFINE_LOSSES = ("mse", "token")
DISTILL_DATA = ("calib", "sampled", "both")


@dataclass(frozen=True)
class RefineConfig:
    """Block-wise refinement after each layer's quantization (`binllm.engine.refine`).

    epochs    passes over the training windows
    lr        Adam step of scales and means, relative to each field's mean |value|
    sign_lr   Adam step of latent weights, relative to their row's mean |W| (0: signs fixed);
              times the codes' SIGN_STEP where they declare one (binllm.methods.trainable)
    windows   calibration windows trained on (0: all of them)
    loss      "mse": mean squared error of the layer's output; "token": each token's squared
              error divided by the FP output's mean square at that token, so that the few
              tokens with massive activations do not outweigh the rest
    autocast  "bfloat16": the training steps' matmuls in bf16 (about twice as fast on CPUs
              with AMX and on GPUs; the kept-or-discarded comparison stays fp32); "float32"
    """

    epochs: int = 4
    lr: float = 2e-2
    sign_lr: float = 1e-2
    windows: int = 0
    loss: str = "token"
    autocast: str = "bfloat16"

    def __post_init__(self):
        _check_training(self, "refine", "1e-2")
        if self.loss not in REFINE_LOSSES:
            raise ConfigError(f"refine loss={self.loss!r}: use {' or '.join(REFINE_LOSSES)}")


@dataclass(frozen=True)
class DistillConfig:
    """Distillation of every linear's scales against the FP model's logits, after the layer
    loop (`binllm.engine.distill`).

    epochs    passes over the training windows (Adam, cosine schedule, one window a step)
    lr        Adam step of scales and means, relative to each field's mean |value|
    sign_lr   Adam step of latent signs (0: signs fixed, the scales-only stage); times the
              codes' SIGN_STEP where they declare one
    topk      the teacher's most likely tokens per position that the KL is taken over
    windows   calibration windows trained on (0: all of them); sampled text holds as many
              tokens as these
    autocast  "bfloat16": the training steps' matmuls in bf16; "float32"
    data      the text trained on: "calib", the calibration windows; "sampled", as many
              tokens sampled from the FP model itself (`teacher_samples`, in sequences of
              sample_len tokens); "both", the two together
    sample_len  tokens per sampled sequence (at most the calibration windows' length)
    sample_windows  calibration windows' worth of sampled text (0: as many as `windows`
              trains on); more sampled text is more text the training sees beyond one corpus
    """

    epochs: int = 2
    lr: float = 5e-3
    sign_lr: float = 0.0
    topk: int = 64
    windows: int = 0
    autocast: str = "bfloat16"
    data: str = "calib"
    sample_len: int = 512
    sample_windows: int = 0

    def __post_init__(self):
        _check_training(self, "distill", "5e-3")
        if not isinstance(self.topk, int) or self.topk < 1:
            raise ConfigError(f"distill topk={self.topk}: use a positive count, e.g. 64")
        if self.data not in DISTILL_DATA:
            raise ConfigError(f"distill data={self.data!r}: use {', '.join(DISTILL_DATA)}")
        if not isinstance(self.sample_len, int) or self.sample_len < 2:
            raise ConfigError(f"distill sample_len={self.sample_len}: use at least 2 tokens, "
                              "e.g. 512")
        if not isinstance(self.sample_windows, int) or self.sample_windows < 0:
            raise ConfigError(f"distill sample_windows={self.sample_windows}: use 0 (as many "
                              "as the calibration windows) or a positive count, e.g. 64")


def _check_training(c, stage: str, example_lr: str) -> None:
    """The settings a training stage's config shares (epochs, lr, sign_lr, windows,
    autocast), each refused in one line that names the stage."""
    if not isinstance(c.epochs, int) or c.epochs < 1:
        raise ConfigError(f"{stage} epochs={c.epochs}: use at least 1")
    for name in ("lr", "sign_lr"):
        v = getattr(c, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v < 1):
            raise ConfigError(f"{stage} {name}={v}: use a relative step in [0, 1), "
                              f"e.g. {example_lr}")
    if not isinstance(c.windows, int) or c.windows < 0:
        raise ConfigError(f"{stage} windows={c.windows}: use 0 (all) or a positive count")
    if c.autocast not in ("bfloat16", "float32"):
        raise ConfigError(f"{stage} autocast={c.autocast!r}: use bfloat16 or float32")


ROTATIONS = ("hadamard",)
OUTSIDE_OPTIONS = ("keep", "q8", "q4")  # embeddings / lm_head (`binllm.engine.outside`)


@dataclass(frozen=True)
class QuantizeConfig:
    """What to do to every binarizable linear of a model.

    method       registered method name (`binllm methods`)
    method_args  overrides of the method's arguments (strings are converted)
    block_size   columns per reconstruction block (128 in all three papers)
    percdamp     damping λ = percdamp · mean diag H (0.01)
    feedback     error-feedback mode; None = the method's own ("column", "block", "none")
    skip         names (or name suffixes) of linears inside decoder layers to leave alone
    refine       block-wise refinement of each layer's codes (None: the method's codes as
                 they are, as in the papers)
    distill      distillation of every linear's scales against the FP model's logits after
                 the layer loop (None: none; beyond the papers)
    rotate       "hadamard": fold the norms and rotate the residual stream before quantizing
                 (`binllm.engine.rotate`); None: the model as it is
    embeddings   the input embeddings: "keep", "q8" or "q4" (`binllm.engine.outside`)
    lm_head      the output layer: "keep", "q8" or "q4"
    """

    method: str
    method_args: Mapping[str, Any] = field(default_factory=dict)
    block_size: int = 128
    percdamp: float = 0.01
    feedback: str | None = None
    skip: tuple[str, ...] = ()
    refine: RefineConfig | None = None
    distill: DistillConfig | None = None
    rotate: str | None = None
    embeddings: str = "keep"
    lm_head: str = "keep"
    version: ClassVar[int] = FORMAT_VERSION

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size}: must be a positive number of "
                              "columns (128 in the papers)")
        if not (isinstance(self.percdamp, (int, float)) and math.isfinite(self.percdamp)
                and 0 < self.percdamp < 10):
            raise ConfigError(f"percdamp={self.percdamp}: "
                              "use a small positive fraction such as 0.01")
        if self.feedback not in (None, "column", "block", "none"):
            raise ConfigError(f"feedback={self.feedback!r}: use column, block or none")
        spec = METHODS.get(self.method)
        if self.feedback is not None and spec is not None \
                and self.feedback not in spec.cls.feedbacks:
            allowed = " or ".join(f"feedback={f!r}" for f in spec.cls.feedbacks)
            raise ConfigError(f"feedback={self.feedback!r}: {self.method} runs with {allowed} "
                              "only; leave it unset")
        if self.rotate not in (None, *ROTATIONS):
            raise ConfigError(f"rotate={self.rotate!r}: use {', '.join(ROTATIONS)} or None")
        for name in ("embeddings", "lm_head"):
            if getattr(self, name) not in OUTSIDE_OPTIONS:
                raise ConfigError(f"{name}={getattr(self, name)!r}: use one of "
                                  f"{', '.join(OUTSIDE_OPTIONS)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method_args"] = dict(self.method_args)
        d["skip"] = list(self.skip)
        d["version"] = self.version
        # unset: absent, as in a plain run's dict
        for key, unset in (("refine", None), ("distill", None), ("rotate", None),
                           ("embeddings", "keep"), ("lm_head", "keep")):
            if d[key] == unset:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantizeConfig":
        version = d.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"config version {version} is not supported (this binllm reads "
                             f"version {FORMAT_VERSION}); upgrade binllm")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["skip"] = tuple(kw.get("skip", ()))
        if kw.get("refine") is not None:
            kw["refine"] = RefineConfig(**kw["refine"])
        if kw.get("distill") is not None:
            kw["distill"] = DistillConfig(**kw["distill"])
        return cls(**kw)
