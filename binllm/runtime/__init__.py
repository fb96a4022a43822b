"""Running a loaded model fast, whole: the lean decode loop.

`decode` holds `LeanDecoder` (the model's own modules called token by token with a
preallocated key/value cache, no transformers generation machinery) and `lean_generate`;
`binllm.evaluation.generate` runs it for the families it takes and transformers' `generate`
for the others. May import `binllm.kernels` (the fused decode glue) and `binllm.errors`.
"""

from .decode import FAMILIES, DecodeError, LeanDecoder, lean_generate, unsupported

__all__ = ["FAMILIES", "DecodeError", "LeanDecoder", "lean_generate", "unsupported"]
