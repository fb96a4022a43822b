"""llama.cpp itself, through llama-cpp-python (`pip install 'binllm[llama]'`): for checking an
exported GGUF against binllm and timing it beside binllm."""

from __future__ import annotations

import os
from typing import Any


def llama_cpp_model(path: str | os.PathLike, **kwargs: Any):
    """llama-cpp-python's `Llama` of the GGUF at `path` (kwargs: n_ctx, n_threads, …), computed
    by ggml's plain CPU kernels: no extra buffer types (AMX tiles, repacked weights), which a
    -DGGML_NATIVE build picks where the CPU lists AMX even when the kernel does not let a
    process use it (SIGILL in VMs)."""
    import llama_cpp
    from llama_cpp import llama as high_level

    bindings = high_level.llama_cpp  # where Llama takes its model parameters' defaults from
    default = bindings.llama_model_default_params

    def plain_kernels():
        params = default()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = plain_kernels
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)
    finally:
        bindings.llama_model_default_params = default
