"""The fused glue of a lean single-token decode loop (`binllm.runtime.decode`): the small torch
ops between a LLaMA layer's linears, each one compiled call (`cpu_decode.cpp`), every
decoder layer of a token in one call (`decode_layers`, `cpu_layers.cpp`), and a dense bf16
weight's product with the token (`dense_gemv`, `cpu_dense.cpp`).

At batch 1 a small model's RMSNorm is ~8 torch ops and its rotary embedding, cache write and
attention a dozen more, each a few microseconds of dispatch around little arithmetic; here each
is one call of a pybind11 function of the compiled module (less per-call overhead than a
torch.ops dispatch). Each returns None where the compiled kernels do not compute its input (no
extension, another device, gradients wanted, a dtype other than fp32, bf16 or fp16, or mixed
dtypes), and the caller then runs its torch ops; a bad shape raises the extension's error. The
compiled functions decide the None themselves, so a loop that holds `extension().module` may
call `module.rms_norm(x, weight, eps)` and `module.decode_attention(...)` directly (the same
results, a Python call less).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .cpu import IMPLS
from .cpu_build import extension


def rms_norm(x: Tensor, weight: Tensor, eps: float, impl: str = "avx512") -> Tensor | None:
    """transformers' LlamaRMSNorm.forward for x (..., d) and weight (d,) of x's dtype: per row
    t = x · rsqrt(mean(x²) + eps) computed in fp32 and rounded to x's dtype, then weight · t
    computed in fp32 and rounded once. mean's fp32 sum is grouped otherwise than torch's, so a
    bf16 or fp16 t may round the other way (one ulp; y then within two); fp32 agrees to
    round-off. None where the compiled kernel does not compute it (module docstring); rows run
    on one thread at decode, on torch's threads for many rows."""
    status = extension()
    return status.module.rms_norm(x, weight, eps, IMPLS[impl]) if status.ok else None


def decode_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                     k_cache: Tensor, v_cache: Tensor, pos: int, scale: float,
                     impl: str = "avx512") -> Tensor | None:
    """One new token's attention with its rotary embedding and cache write, in one call.

    q (1, 1, H·hd), k and v (1, 1, KV·hd) (the projections' outputs), cos and sin (hd,) at
    position pos (transformers' convention: rotated t = t·cos + rotate_half(t)·sin, each
    product and the sum rounded to the dtype as torch's ops round them), k_cache and v_cache
    (1, KV, max_len, hd) contiguous, H a multiple of KV, 0 ≤ pos < max_len, every tensor of one
    dtype. The rotated k and v are written into k_cache[0, :, pos] and v_cache[0, :, pos];
    returns out (1, 1, H·hd) whose head h (kv head h // (H / KV)) is
    softmax(scale · q_h K[0..pos]ᵀ) V[0..pos], computed in fp32 and rounded once (SDPA with
    enable_gqa to fp32 round-off). None where the compiled kernel does not compute it (module
    docstring); heads run on torch's threads only for a long cache.
    """
    status = extension()
    if not status.ok:
        return None
    return status.module.decode_attention(q, k, v, cos, sin, k_cache, v_cache, pos, scale,
                                          IMPLS[impl])


def dense_gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None,
               impl: str = "avx512") -> Tensor | None:
    """F.linear(x, weight, bias) for one token x (..., cols) and a dense weight (rows, cols),
    all bf16 on the CPU: per row the products summed in fp32 (AVX512-BF16's pair dot product
    where the CPU has it), the bias added, rounded once to bf16, so equal to torch's linear to
    fp32 round-off and one bf16 rounding, not bit for bit. It streams the weight at about the
    rate one core reads memory, where torch's bf16 GEMV reads a wide table at about half of it
    (a tied 49,152 × 576 output layer: the largest read of a small model's token). None where
    the compiled kernel does not compute it (module docstring, or another dtype, more than one
    token, a weight not contiguous, or an extension built without AVX-512, where a portable
    loop would be slower than torch's linear)."""
    status = extension()
    return status.module.dense_gemv(x, weight, bias, IMPLS[impl]) if status.ok else None


def decode_layers(layers: Sequence[tuple], cos: Tensor, sin: Tensor, scale: float,
                  impl: str = "avx512") -> Any:
    """The decoder layers of a LLaMA-family model for one new token, as one compiled call.

    layers: per layer (input_norm weight, its eps, post-attention norm weight, its eps,
    linears, k_cache, v_cache), linears seven (decoder, weight, bias) for q, k, v, o, gate, up
    and down: a packed layer's bound CPU decoder (`binllm.kernels.cpu.bind_decoder`) with
    weight None, or None and a dense weight (rows, cols); cos and sin (max_len, head_dim) the
    rotary embedding at every position; caches (1, KV, max_len, head_dim). Returns
    `layers_call(h, pos) -> h` for h (1, 1, d), which runs every layer as the lean loop does
    (this module's rms_norm and decode_attention, each linear's decoder or F.linear, torch's
    add, mul and silu: the same results bit for bit) with no Python between them, writing the
    token's keys and values into the caches. None where the extension is not built or a
    linear's decoder is not the compiled one (another backend's, or one that declines
    everything): the caller then runs its loop."""
    status = extension()
    if not status.ok:
        return None
    compiled = status.module.Decoder
    if any(dec is not None and not isinstance(dec, compiled)
           for layer in layers for dec, _, _ in layer[4]):
        return None
    return status.module.DecodeLayers(list(layers), cos, sin, scale, IMPLS[impl])
