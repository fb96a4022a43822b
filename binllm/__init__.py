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
    "load": "binllm.checkpoint",
    "save_binarized": "binllm.checkpoint",
    "load_binarized": "binllm.checkpoint",
    "inspect_saved": "binllm.saved_dir",
    "BinaryLinear": "binllm.layers",
    "LayerJournal": "binllm.journal",
    "QATConfig": "binllm.qat",
    "prepare_qat": "binllm.qat",
    "finalize_qat": "binllm.qat",
    "train_qat": "binllm.qat_train",
}

__all__ = sorted(_LAZY)

# AutoModelForCausalLM.from_pretrained(DIR) of binllm directories: registers binllm's quantizer
# when transformers loads its quantizer registry, without importing transformers here.
from .hf_hook import install as _install_hf_hook  # noqa: E402

_install_hf_hook()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'binllm' has no attribute {name!r}")
