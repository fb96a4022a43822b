"""`AutoModelForCausalLM.from_pretrained(DIR)` for binllm directories, through transformers'
quantizer registry (`register_quantization_config` / `register_quantizer`, quant_method
"binllm").

The quantizer does one thing: before the weights are loaded it swaps the linears listed in
quantization_config.layers for empty BinaryLinears (on the meta device), whose buffers then
receive the packed tensors by their on-disk names. Everything else is transformers' own
loading. `binllm.load(DIR)` does the same swap without transformers' loader and stays the
primary path.

When does registration happen? `import binllm` must not import transformers, so binllm's
`__init__` installs an import hook that calls `register()` right after transformers imports
`transformers.quantizers.auto` (or at once if it already has). `register()` may also be
called by hand; it is idempotent.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .layers import replace_linears
from .layout import FORMAT_VERSION, PackedLayout
from .saved_dir import QUANT_METHOD, FormatVersionError


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

    def _process_model_before_weight_loading(self, model, **kwargs):
        layouts = {n: PackedLayout.from_dict(d) for n, d in self.quantization_config.layers.items()}
        replace_linears(model, layouts, device="meta")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self) -> bool:
        # save_pretrained would copy the recorded file sizes and checksums of the directory it
        # was loaded from into a new one; binllm directories are written by save_binarized only
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
