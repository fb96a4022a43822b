"""`AutoModelForCausalLM.from_pretrained(DIR)` for binllm directories, through transformers'
quantizer registry (`register_quantization_config` / `register_quantizer`, quant_method
"binllm").

Before the weights are loaded the quantizer runs the checks of `binllm.load` on the files
transformers resolved (config, sizes and sha256 of every shard as recorded at save, every
stored tensor's header) and swaps the linears listed in quantization_config.layers for empty
BinaryLinears (on the meta device), whose buffers then receive the packed tensors by their
on-disk names; then the skeleton is checked against the files (every tensor present with its
declared shape and dtype, every linear with stored codes listed), so nothing is ever left
randomly initialised. Everything else is transformers' own loading. After loading, each
BinaryLinear whose buffers hold exactly its file's bytes derives its kernel form and releases
them (`release.attach_sources`, as `binllm.load` does). After loading,
`model.save_pretrained(DIR)` writes the packed format again (`checkpoint.save_loaded`).
`binllm.load(DIR)` does the same without transformers' loader and stays the primary path.

When does registration happen? `import binllm` must not import transformers, so binllm's
`__init__` installs an import hook that calls `register()` right after transformers imports
`transformers.quantizers.auto` (or at once if it already has). The installed package ships
`binllm_hf_hook.pth`, which imports binllm at interpreter start-up, so that hook is in place
in every Python process of the environment, also without `import binllm` (lm_eval, scripts).
`register()` may also be called by hand; it is idempotent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import bind_save_pretrained, check_model_matches
from .release import attach_sources, return_freed_memory, warm_kernels
from .embedding import replace_packed
from .layout import FORMAT_VERSION
from .saved_dir import QUANT_METHOD, FormatVersionError, read_saved


class BinllmConfig(QuantizationConfigMixin):
    """quantization_config of a binllm directory, kept as the plain dict binllm wrote."""

    def __init__(self, format_version: int | None = None, layers: dict | None = None,
                 **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = layers or {}
        kwargs.pop("quant_method", None)
        for key, value in kwargs.items():
            setattr(self, key, value)


class BinllmHfQuantizer(HfQuantizer):
    """Loads binllm's packed linears; it cannot quantize (use `binllm quantize`)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs) -> None:
        version = self.quantization_config.format_version
        if version != FORMAT_VERSION:
            raise FormatVersionError(f"this directory is binllm format_version {version!r}; the "
                                     f"installed binllm reads format_version {FORMAT_VERSION}")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        directory = (Path(checkpoint_files[0]).parent if checkpoint_files
                     else Path(model.config.name_or_path))
        saved = read_saved(directory, verify=True)  # what binllm.load checks, same errors
        replace_packed(model, saved.layouts, saved.quantization.get("tied_heads"),
                       device="meta")
        check_model_matches(saved, model)
        self.binllm_saved = saved
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        saved = getattr(self, "binllm_saved", None)
        if saved is not None:  # one representation: the form, the codes read back on demand
            attach_sources(model, saved)
        warm_kernels(model)
        return_freed_memory()
        return bind_save_pretrained(model)

    def is_serializable(self) -> bool:
        # transformers' own save_pretrained would copy the recorded file sizes and checksums of
        # the directory the model came from; loaded models get binllm's save_pretrained instead
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make transformers know quant_method "binllm" (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BinllmConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BinllmHfQuantizer)
