"""binllm: post-training binarization of LLMs (PB-LLM, BiLLM, ARB-LLM) in one engine.

`import binllm` stays light: torch and transformers are imported on first use of a name.
Layout: `engine/` (calibration, the one reconstruction loop), `methods/` (the registered
methods and their codes), `packed/` (on-disk format, BinaryLinear, loading), `kernels/` (fast
forward paths), `qat/`, `evaluation/` (data, perplexity, lm-eval), `cli/`; `atomic` is the one
atomic-write helper.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "BinllmError": "binllm.errors",
    "QuantizeConfig": "binllm.engine.config",
    "RefineConfig": "binllm.engine.config",
    "binarize_model": "binllm.engine.binarize",
    "quantize": "binllm.engine.binarize",
    "QuantizeReport": "binllm.engine.binarize",
    "METHODS": "binllm.methods",
    "get_method": "binllm.methods",
    "reconstruct": "binllm.engine.reconstruct",
    "perplexity": "binllm.evaluation.perplexity",
    "load": "binllm.packed.checkpoint",
    "save_binarized": "binllm.packed.checkpoint",
    "load_binarized": "binllm.packed.checkpoint",
    "inspect_saved": "binllm.packed.saved_dir",
    "BinaryLinear": "binllm.packed.layers",
    "LayerJournal": "binllm.engine.journal",
    "QATConfig": "binllm.qat.model",
    "prepare_qat": "binllm.qat.model",
    "finalize_qat": "binllm.qat.model",
    "train_qat": "binllm.qat.train",
}

__all__ = sorted(_LAZY)

# AutoModelForCausalLM.from_pretrained(DIR) of binllm directories: registers binllm's quantizer
# when transformers loads its quantizer registry, without importing transformers here.
from .packed.hf_hook import install as _install_hf_hook  # noqa: E402

_install_hf_hook()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'binllm' has no attribute {name!r}")
