"""The method registry: every method (and preset) by name, with its argument dataclass.

Adding a method means one module in this package and one line in `_SPECS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .arbllm import ARB, ARBRC, ARBX
from .base import BlockContext, Feedback, Method, MethodArgumentError, describe_args, parse_args
from .billm import BiLLM
from .binary_factor import BinaryFactor
from .block_sign import BlockSign
from .codes import BinaryCodes, UniformCodes
from .gptq import GPTQ
from .pbllm import PBLLM
from .sign import RtnSign


@dataclass(frozen=True)
class MethodSpec:
    """A registered name: the method class and the preset argument values it starts from."""

    name: str
    cls: type[Method]
    preset: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""

    def build(self, overrides: Mapping[str, Any] | None = None) -> Method:
        args = parse_args(self.cls.Args, {**self.preset, **(overrides or {})})
        return self.cls(args)


_SPECS = (
    MethodSpec("rtn-sign", RtnSign, summary="per-row α·sign(W−μ)+μ, no reconstruction (baseline)"),
    MethodSpec("gptq", GPTQ,
               summary="uniform asymmetric GPTQ, 1–8 bits, per row or group (baseline)"),
    MethodSpec("billm", BiLLM, summary="BiLLM: salient columns at residual order 2, bell-shaped "
               "split of the rest into two order-1 groups, block feedback"),
    MethodSpec("arb", ARB, summary="ARB-LLM: alternating refined (μ, α, B) on BiLLM's masks"),
    MethodSpec("arb-x", ARBX, summary="ARB-X: ARB plus calibration-aware (μ, α) from H_blk/2"),
    MethodSpec("arb-rc", ARBRC, summary="ARB-RC: row and column scales, no mean"),
    MethodSpec("arb-llm-x", ARBX, {"cgb": True}, "ARB-LLM_X: ARB-X with the column-group bitmap"),
    MethodSpec("arb-llm-rc", ARBRC, {"cgb": True},
               "ARB-LLM_RC: ARB-RC with the column-group bitmap"),
    MethodSpec("pbllm", PBLLM, summary="PB-LLM: unstructured salient weights at high_bit, "
               "the rest α·sign(W−μ)+μ, GPTQ column feedback"),
    MethodSpec("pbllm-10", PBLLM, {"salient_fraction": 0.1, "salient_metric": "hessian"},
               "PB-LLM, 10 % salient at 8 bit (1.7 paper bits), Hessian saliency"),
    MethodSpec("pbllm-20", PBLLM, {"salient_fraction": 0.2, "salient_metric": "hessian"},
               "PB-LLM, 20 % salient at 8 bit (2.4 paper bits), Hessian saliency"),
    MethodSpec("pbllm-30", PBLLM, {"salient_fraction": 0.3, "salient_metric": "hessian"},
               "PB-LLM, 30 % salient at 8 bit (3.1 paper bits), Hessian saliency"),
    MethodSpec("block-sign", BlockSign, summary="sign plane with α (and μ, β) per row and block, "
               "GPTQ column feedback alternating with least-squares scales (ARB)"),
    MethodSpec("q1_0", BlockSign, {"block": 128, "mean": False, "column_scales": False},
               "llama.cpp Q1_0: sign bits + one fp16 α per 128 weights (1.125 bits), GPTQ + ARB α"),
    MethodSpec("binary-factor", BinaryFactor, summary="NanoQuant: diag(s_out)·sign(U)·sign(V)ᵀ·"
               "diag(s_in), rank from a stored-bits budget (bits=1.0; 0.55–2), ADMM init"),
)

METHODS: Mapping[str, MethodSpec] = MappingProxyType({s.name: s for s in _SPECS})


def get_method(name: str, overrides: Mapping[str, Any] | None = None) -> Method:
    """Instantiate a registered method; unknown names and arguments raise MethodArgumentError."""
    if name not in METHODS:
        raise MethodArgumentError(
            f"unknown method {name!r}; registered methods: {', '.join(METHODS)} "
            "(see `binllm methods`)")
    return METHODS[name].build(overrides)


__all__ = ["METHODS", "MethodSpec", "get_method", "Method", "BlockContext", "Feedback",
           "MethodArgumentError", "BinaryCodes", "UniformCodes", "describe_args", "parse_args"]
