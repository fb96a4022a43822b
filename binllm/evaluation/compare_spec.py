"""`binllm compare`'s inputs: method specs (`name:key=value:…`) and the shared protocol.

A spec's keys go to the method (`--method-arg`) or, for `ENGINE_KEYS` and `<stage>_<setting>`
(`refine_epochs`, `distill_lr`),
to the engine; the protocol is what every method shares, and its `identity()` (settings and
input fingerprints) is what resuming a comparison checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BinllmError


class CompareError(BinllmError, ValueError):
    """A bad method spec, or an output directory holding results of another protocol."""


# -- method specs --------------------------------------------------------------------------
# spec keys for the engine (`--refine`, `--lm-head` …), plus <stage>_<setting> of a stage
ENGINE_KEYS = ("refine", "distill", "rotate", "embeddings", "lm_head", "feedback", "dtype")
STAGES = ("refine", "distill")  # refine_epochs=4 → --refine-arg epochs=4


def _stage_of(key: str) -> str | None:
    """The stage whose setting `key` is (refine_epochs → refine), None for other keys."""
    return next((s for s in STAGES if key.startswith(f"{s}_")), None)


def _is_engine_key(key: str) -> bool:
    return key in ENGINE_KEYS or _stage_of(key) is not None


@dataclass(frozen=True)
class MethodRun:
    """One method of a comparison: a label, a registered name, its --method-arg pairs and
    the engine options (refine, distill, rotate, embeddings, lm_head, feedback, dtype: the
    dtype the model is loaded and calibrated in, <stage>_<setting>)."""

    label: str
    method: str
    args: tuple[tuple[str, str], ...] = ()
    engine: tuple[tuple[str, str], ...] = ()

    def key(self) -> dict[str, Any]:
        key = {"method": self.method, "method_args": dict(self.args)}
        if self.engine:  # a plain run's key stays as it is (earlier results still match)
            key["engine"] = dict(self.engine)
        return key

    def engine_argv(self) -> list[str]:
        argv = []
        for k, v in self.engine:
            stage = _stage_of(k)
            argv += ([f"--{k.replace('_', '-')}", v] if k in ENGINE_KEYS
                     else [f"--{stage}-arg", f"{k.removeprefix(stage + '_')}={v}"])
        return argv


def parse_method_spec(spec: str, label: str | None = None) -> MethodRun:
    """`name:key=value:key=value` → MethodRun (label: the spec, unless given)."""
    name, *pairs = [p.strip() for p in spec.strip().split(":")]
    if not name:
        raise CompareError(f"method spec {spec!r}: start with a method name, e.g. gptq:bits=2")
    args = []
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise CompareError(f"method spec {spec!r}: {pair!r} is not key=value "
                               "(write name:key=value:key=value, e.g. gptq:bits=2:groupsize=128)")
        args.append((key.strip(), value.strip()))
    engine = tuple((k, v) for k, v in args if _is_engine_key(k))
    return MethodRun(label or spec.strip(), name,
                     tuple((k, v) for k, v in args if not _is_engine_key(k)), engine)


def parse_method_specs(text: str) -> list[MethodRun]:
    """Comma-separated specs; each label may appear once."""
    runs = [parse_method_spec(s) for s in text.split(",") if s.strip()]
    if not runs:
        raise CompareError("the method list is empty: name at least one method, e.g. "
                           "billm,gptq:bits=2")
    labels = [r.label for r in runs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise CompareError(f"method spec(s) {', '.join(dup)} given twice")
    return runs


# -- protocol ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """What every method shares: model, calibration windows, evaluation streams, loop settings.

    `device` is not part of the identity that resuming checks; everything else is.
    """

    model: str
    calib: str = "c4"
    calib_split: str = "train"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    eval: tuple[str, ...] = ("wikitext2", "ptb", "c4")
    eval_split: str = "test"
    max_windows: int | None = None
    block_size: int = 128
    percdamp: float = 0.01
    data_dir: str | None = None
    device: str = "cpu"

    def identity(self) -> dict[str, Any]:
        """The settings and what identifies the inputs (`binllm.evaluation.fingerprint`)."""
        from .fingerprint import inputs_fingerprint

        d = dataclasses.asdict(self)
        d.pop("device")
        d["eval"] = list(self.eval)
        read = [(self.calib, self.calib_split), *((e, self.eval_split) for e in self.eval)]
        d["inputs"] = inputs_fingerprint(self.model, list(dict.fromkeys(read)), self.data_dir)
        return d

    def _common(self) -> list[str]:
        out = ["--eval-split", self.eval_split, "--device", self.device]
        for flag, value in (("--seqlen", self.seqlen), ("--max-windows", self.max_windows),
                            ("--data-dir", self.data_dir)):
            if value is not None:
                out += [flag, str(value)]
        return out

    def quantize_argv(self, run: MethodRun, report: Path) -> list[str]:
        argv = ["quantize", self.model, "--method", run.method]
        for k, v in run.args:
            argv += ["--method-arg", f"{k}={v}"]
        return argv + run.engine_argv() + ["--calib", self.calib, "--calib-split", self.calib_split,
                       "--nsamples", str(self.nsamples), "--seed", str(self.seed),
                       "--block-size", str(self.block_size), "--percdamp", str(self.percdamp),
                       "--eval", ",".join(self.eval), *self._common(), "--report", str(report)]

    def eval_argv(self, report: Path) -> list[str]:
        return ["eval", self.model, "--datasets", ",".join(self.eval), *self._common(),
                "--report", str(report)]
