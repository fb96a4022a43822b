"""The tensors of a GGUF export: Q1_0 blocks from packed codes, fallback types, file type.

Binarized linears whose codes are exactly llama.cpp's Q1_0 (`--method q1_0`: one sign plane,
one fp16 α per row and 128 columns, no mean, no groups, no column scales) are written as Q1_0
tensors by a byte reshuffle of the packed buffers, never through floats. llama.cpp's layout
(ggml-common.h `block_q1_0`, ggml-quants.c `dequantize_row_q1_0`) is per block of 128 weights
of a row: the fp16 scale d, then qs[16] with weight j at bit j % 8 of qs[j / 8], bit 1 = +d,
bit 0 = −d. binllm's sign stream (binllm.packing) puts weight i of the row-major matrix at bit
i % 8 of byte i // 8 with 1 = +1, so for rows of 128·k weights a block's 16 bytes are the
stream's bytes as they are; GGUF's 18-byte block is α's two little-endian bytes, then those.

A q1_0 linear whose in_features is not a multiple of 128 (SmolLM2: 576; stories260K: 64, 172)
cannot be a ggml Q1_0 tensor. It goes in the fallback type the caller picks (`FALLBACK_TYPES`):
F16 (its weights ±α are exact in fp16: the default), or Q8_0 / Q4_0 quantized from those ±α
weights with gguf-py's quantizer (blocks of 32 columns; a width that is not a multiple of 32
goes as exact F16). Every other tensor is written as F32 (1-D, and float32 sources) or F16.
q_proj / k_proj rows are permuted as llama.cpp's converter does for the llama architecture
(its RoPE pairs dimensions (i, i + d/2) of a head where Hugging Face pairs (2i, 2i + 1)): a
row permutation, which permutes Q1_0 blocks whole.

`general.file_type` (`file_type`) names the type that holds the most weights among the matrices
(2-D tensors; norms and other 1-D tensors do not count, as llama.cpp's "MOSTLY_" types say),
so MOSTLY_Q1_0 only when most weights are Q1_0: SmolLM2, whose Q1_0 down_proj hold a quarter of
the linears' weights, is MOSTLY_F16 (or MOSTLY_Q8_0 with --fallback-type q8_0).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..packed.layout import PackedLayout, unpack
from .target import ExportError

QK1_0 = 128  # weights per Q1_0 block
Q1_0_BYTES = 2 + QK1_0 // 8  # fp16 d + 16 sign bytes
NEEDED = ("Q1_0 needs one sign plane and one fp16 scale per 128 consecutive weights of a row "
          "(no mean, no groups, no column scales): quantize with --method q1_0")


@dataclass(frozen=True)
class FallbackType:
    ggml: str          # GGMLQuantizationType name
    block: int         # columns per block: in_features must be a multiple
    exact: bool        # holds ±α weights without error


# --fallback-type: the type of binarized linears Q1_0 cannot hold
FALLBACK_TYPES = {"f16": FallbackType("F16", 1, True), "q8_0": FallbackType("Q8_0", 32, False),
                  "q4_0": FallbackType("Q4_0", 32, False)}

# tensor type holding most weights → general.file_type (gguf.LlamaFileType member name)
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0",
              "Q4_0": "MOSTLY_Q4_0", "Q1_0": "MOSTLY_Q1_0"}


@dataclass(frozen=True)
class GgufTensor:
    source: str                 # binllm / Hugging Face name
    type: str                   # Q1_0, Q8_0, Q4_0, F16, F32
    data: np.ndarray            # float array, or the blocks' bytes (uint8) of quantized types
    shape: tuple[int, ...]      # logical (rows, columns)
    note: str = ""


# -- Q1_0 ---------------------------------------------------------------------------------------
def q1_0_problem(layout: PackedLayout, method: str = "these") -> str | None:
    """Why `layout` is not Q1_0 (a sentence naming what the codes have), or None if it is."""
    p = layout.params
    if layout.format == "uniform":
        return (f"{method} codes are {p.get('bits')}-bit integers with a scale and zero point "
                f"per {p.get('groupsize')} weights")
    if layout.format == "partial-binary":
        return f"{method} codes keep salient weights at {p.get('high_bit')} bits with a bitmap"
    if layout.format != "binary":
        return f"{method} codes are stored as {layout.format!r}"
    have = []
    if int(p["n_salient"]) > 0 or len(p["orders"]) > 1:
        have.append("salient columns and group bitmaps" if int(p["n_salient"]) > 0
                    else f"{len(p['orders'])} weight groups per block")
    if int(p["planes"]) > 1 or max(p["orders"]) > 1:
        have.append(f"{max(p['orders'])} sign planes (residual binarization)")
    if p["mean"]:
        have.append("a row mean μ per block")
    if p["column_scales"]:
        have.append("column scales β")
    if int(p["block_size"]) != QK1_0:
        have.append(f"one scale per {p['block_size']} weights")
    if p.get("scale_dtype", "float16") != "float16":
        have.append(f"{p['scale_dtype']} scales")
    if "q8_rows" in p:
        have.append("8-bit scale codes (scale_codes=q8)")
    return f"{method} codes have {' and '.join(have)}" if have else None


def q1_0_blocks(layout: PackedLayout, packed: dict[str, Tensor]) -> np.ndarray:
    """The Q1_0 bytes (rows, cols / 128 · 18) uint8 of Q1_0-compatible packed codes.

    packed: the layer's buffers as binllm stores them ("signs0" bits(rows·cols), "alpha" fp16
    (1, rows, nblk)); rows of cols = 128·k weights start on a byte boundary of the stream.
    """
    rows, cols = layout.out_features, layout.in_features
    nblk = cols // QK1_0
    signs = packed["signs0"].numpy().reshape(rows, nblk, QK1_0 // 8)  # (rows, nblk, 16)
    alpha = packed["alpha"].to(torch.float16).numpy().reshape(rows, nblk)  # (rows, nblk)
    d = alpha.astype("<f2").view(np.uint8).reshape(rows, nblk, 2)  # little-endian fp16 bytes
    return np.concatenate([d, signs], axis=2).reshape(rows, nblk * Q1_0_BYTES)


def qk_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order of convert_hf_to_gguf's LlamaModel.permute: new row i = old row perm[i]."""
    if rows % (2 * n_head):
        raise ExportError(f"{rows} q/k rows do not split into {n_head} heads of even size")
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def permute_rows(arr: np.ndarray, heads: int | None) -> np.ndarray:
    return arr if heads is None else np.ascontiguousarray(arr[qk_permutation(arr.shape[0], heads)])


# -- every tensor -------------------------------------------------------------------------------
def binarized_tensor(gguf, name: str, layout: PackedLayout, packed: dict[str, Tensor],
                     heads: int | None, fallback: str) -> GgufTensor:
    """One binarized linear: Q1_0 when its rows are whole Q1_0 blocks, else `fallback`."""
    src, shape = f"{name}.weight", (layout.out_features, layout.in_features)
    if layout.in_features % QK1_0 == 0:
        return GgufTensor(src, "Q1_0", permute_rows(q1_0_blocks(layout, packed), heads), shape)
    W = unpack(layout, packed).dequantize()  # (out, in) ±α, α fp16: exact in fp16
    h = W.to(torch.float16)
    if not torch.equal(h.float(), W):
        raise ExportError(f"{name}: Q1_0-compatible codes must be exact in fp16")
    W = permute_rows(h.numpy(), heads)
    why = f"in_features {layout.in_features} is not a multiple of {QK1_0}"
    kind = FALLBACK_TYPES[fallback]
    if kind.exact:
        return GgufTensor(src, "F16", W, shape, f"{why}: exact F16 instead of Q1_0")
    if layout.in_features % kind.block:
        return GgufTensor(src, "F16", W, shape, f"{why} nor of {kind.block} ({kind.ggml}'s "
                          "block): exact F16 instead of Q1_0")
    qtype = getattr(gguf.GGMLQuantizationType, kind.ggml)
    data = gguf.quants.quantize(W.astype(np.float32), qtype)  # (out, in / block · bytes) uint8
    return GgufTensor(src, kind.ggml, data, shape,
                      f"{why}: {kind.ggml} instead of Q1_0, quantized from its ±α weights")


def export_tensors(gguf, saved, state: dict[str, Tensor], hp: dict, float_type: str,
                   fallback: str) -> Iterator[GgufTensor]:
    """Every tensor of the saved model in state order, as written to the GGUF file."""
    perm_heads = {"q_proj": hp["n_head"], "k_proj": hp["n_head_kv"]}
    packed_keys = {f"{n}.{s}": n for n, lay in saved.layouts.items() for s in lay.specs()}
    done = set()
    for key in state:
        if key in packed_keys:
            name = packed_keys[key]
            if name not in done:
                done.add(name)
                layout = saved.layouts[name]
                packed = {s: state[f"{name}.{s}"] for s in layout.specs()}
                yield binarized_tensor(gguf, name, layout, packed,
                                       heads_of(name, perm_heads), fallback)
            continue
        t = state[key]
        heads = heads_of(key.rsplit(".", 1)[0], perm_heads)
        if t.dim() == 1 or float_type == "f32" or (float_type == "auto"
                                                   and t.dtype == torch.float32):
            arr, kind = t.to(torch.float32).numpy(), "F32"
        else:
            arr, kind = t.to(torch.float16).numpy(), "F16"
        yield GgufTensor(key, kind, permute_rows(arr, heads), tuple(t.shape))


def heads_of(module: str, perm_heads: dict[str, int]) -> int | None:
    return perm_heads.get(module.rsplit(".", 1)[-1])


def file_type(tensors: list[tuple[str, tuple[int, ...]]]) -> str:
    """general.file_type (a gguf.LlamaFileType name) of (type, shape) pairs: the type of the
    most weights among 2-D tensors (ALL_F32 when there are none)."""
    weights: dict[str, int] = {}
    for kind, shape in tensors:
        if len(shape) == 2:
            weights[kind] = weights.get(kind, 0) + shape[0] * shape[1]
    if not weights:
        return FILE_TYPES["F32"]
    return FILE_TYPES[max(weights, key=weights.__getitem__)]
