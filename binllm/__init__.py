"""binllm: post-training binarization of LLMs (PB-LLM, BiLLM, ARB-LLM) in one engine.

`import binllm` stays light: torch and transformers are imported on first use of a name.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "QuantizeConfig": "binllm.config",
    "binarize_model": "binllm.binarize",
    "quantize": "binllm.binarize",
    "QuantizeReport": "binllm.binarize",
    "METHODS": "binllm.methods",
    "get_method": "binllm.methods",
    "reconstruct": "binllm.reconstruct",
    "perplexity": "binllm.evaluate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'binllm' has no attribute {name!r}")
