"""`binllm export DIR --format gguf OUT.gguf`: a binllm LLaMA directory as a llama.cpp GGUF file.

Binarized linears whose codes are exactly llama.cpp's Q1_0 (`--method q1_0`: one sign plane,
one fp16 α per row and 128 columns, no mean, no groups, no column scales) are written as Q1_0
tensors by a byte reshuffle of the packed buffers, never through floats. llama.cpp's layout
(ggml-common.h `block_q1_0`, ggml-quants.c `dequantize_row_q1_0`) is per block of 128 weights
of a row: the fp16 scale d, then qs[16] with weight j at bit j % 8 of qs[j / 8], bit 1 = +d,
bit 0 = −d. binllm's sign stream (binllm.packing) puts weight i of the row-major matrix at bit
i % 8 of byte i // 8 with 1 = +1, so for rows of 128·k weights a block's 16 bytes are the
stream's bytes as they are; GGUF's 18-byte block is α's two little-endian bytes, then those.

Codes Q1_0 cannot express are refused with the layout they would need. A q1_0 linear whose
in_features is not a multiple of 128 (stories260K: 64, 172) cannot be a ggml Q1_0 tensor; its
weights ±α are exact in fp16, so it is written as F16 (the report says so). Every other tensor
is written as F32 (1-D, and float32 sources) or F16. q_proj / k_proj rows are permuted as
llama.cpp's convert_hf_to_gguf.py does for the llama architecture (its RoPE pairs dimensions
(i, i + d/2) of a head where Hugging Face pairs (2i, 2i + 1)): a row permutation, which
permutes Q1_0 blocks whole.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_write
from ..packed.layout import PackedLayout, unpack
from ..packed.saved_dir import read_saved, read_tensors
from .gguf_vocab import UNKNOWN, VocabError, read_vocab, special_ids
from ..errors import BinllmError

log = logging.getLogger(__name__)

QK1_0 = 128  # weights per Q1_0 block
Q1_0_BYTES = 2 + QK1_0 // 8  # fp16 d + 16 sign bytes
_NEEDED = ("Q1_0 needs one sign plane and one fp16 scale per 128 consecutive weights of a row "
           "(no mean, no groups, no column scales): quantize with --method q1_0")


class ExportError(BinllmError, ValueError):
    """A model or codes the GGUF export cannot write exactly."""


@dataclass(frozen=True)
class ExportedTensor:
    name: str      # GGUF name
    source: str    # binllm / Hugging Face name
    type: str      # Q1_0, F16, F32
    shape: tuple[int, ...]
    note: str = ""


@dataclass
class ExportReport:
    path: str
    tensors: list[ExportedTensor] = field(default_factory=list)
    file_bytes: int = 0
    vocab_source: str = ""

    def count(self, kind: str) -> int:
        return sum(t.type == kind for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "file_bytes": self.file_bytes,
                "vocab_source": self.vocab_source, "tensors": [asdict(t) for t in self.tensors]}


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


# -- llama metadata -----------------------------------------------------------------------------
def qk_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order of convert_hf_to_gguf's LlamaModel.permute: new row i = old row perm[i]."""
    if rows % (2 * n_head):
        raise ExportError(f"{rows} q/k rows do not split into {n_head} heads of even size")
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _hparams(config: dict) -> dict[str, Any]:
    if config.get("model_type") != "llama":
        raise ExportError(f"GGUF export writes llama.cpp's llama architecture; this model is "
                          f"{config.get('model_type')!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act {config['hidden_act']!r}: llama.cpp's llama architecture "
                          "computes SiLU")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}  # transformers 4 / 5
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ExportError(f"rope type {kind!r} ({rope}) is not supported by the GGUF export "
                          "(default and linear only)")
    n_head = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // n_head
    return {"n_embd": config["hidden_size"], "n_ff": config["intermediate_size"],
            "n_layer": config["num_hidden_layers"], "n_head": n_head,
            "n_head_kv": config.get("num_key_value_heads") or n_head, "head_dim": hd,
            "n_ctx": config.get("max_position_embeddings", 2048),
            "eps": config.get("rms_norm_eps", 1e-5),
            "theta": config.get("rope_theta") or rope.get("rope_theta", 10000.0),
            "linear_rope": rope.get("factor") if kind == "linear" else None,
            "vocab": config["vocab_size"]}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install 'binllm[export]' "
                          "(or pip install gguf)") from None
    if not hasattr(gguf.GGMLQuantizationType, "Q1_0"):
        raise ExportError(f"gguf {getattr(gguf, '__version__', '?')} has no Q1_0 type; "
                          "pip install 'gguf>=0.19'")
    return gguf


# -- export ---------------------------------------------------------------------------------------
def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, *,
                tokenizer_model: str | os.PathLike | None = None,
                float_type: str = "auto") -> ExportReport:
    """Write the binllm directory `model_dir` as the GGUF file `out` (atomically).

    float_type: "auto" (F32 for float32 sources, else F16), "f16" or "f32" for the tensors that
    are not binarized (1-D tensors are always F32, as llama.cpp's converter writes them).
    """
    if float_type not in ("auto", "f16", "f32"):
        raise ExportError(f"float type {float_type!r}: choose auto, f16 or f32")
    gguf = _gguf()
    saved = read_saved(model_dir, verify=False)
    hp = _hparams(saved.config)
    method = saved.quantization.get("method", "these")
    for name, layout in saved.layouts.items():
        why = q1_0_problem(layout, method)
        if why:
            raise ExportError(f"{name}: {why}; {_NEEDED}")
    try:
        vocab = read_vocab(saved.path, Path(tokenizer_model) if tokenizer_model else None)
    except VocabError as e:
        raise ExportError(str(e)) from None
    state = read_tensors(saved)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["n_layer"])
    report = ExportReport(str(out), vocab_source=vocab.source)
    out = Path(out)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), "llama")
        _write_metadata(gguf, w, saved, hp, vocab)
        has_q1 = False
        for src, kind, arr, shape, note in _tensors(saved, state, hp, float_type):
            gname = names.get_name(src, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ExportError(f"{src} has no llama.cpp name (not a LLaMA tensor)")
            if kind == "Q1_0":
                w.add_tensor(gname, arr, raw_dtype=gguf.GGMLQuantizationType.Q1_0)
                has_q1 = True
            else:
                w.add_tensor(gname, arr)
            report.tensors.append(ExportedTensor(gname, src, kind, shape, note))
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q1_0 if has_q1 else gguf.LlamaFileType.ALL_F32)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.chmod(0o644)

    atomic_write(out, write)
    report.file_bytes = out.stat().st_size
    log.info("wrote %s: %d Q1_0, %d F16, %d F32 tensors", out, report.count("Q1_0"),
             report.count("F16"), report.count("F32"))
    return report


def _write_metadata(gguf, w, saved, hp: dict, vocab) -> None:
    w.add_name(Path(saved.path).name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(hp["n_ctx"])
    w.add_embedding_length(hp["n_embd"])
    w.add_block_count(hp["n_layer"])
    w.add_feed_forward_length(hp["n_ff"])
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(hp["n_head_kv"])
    w.add_rope_freq_base(float(hp["theta"]))
    w.add_layer_norm_rms_eps(float(hp["eps"]))
    w.add_vocab_size(hp["vocab"])
    w.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["n_embd"] // hp["n_head"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if hp["linear_rope"]:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp["linear_rope"]))
    if len(vocab.tokens) != hp["vocab"]:
        raise ExportError(f"the tokenizer has {len(vocab.tokens)} tokens, the model "
                          f"{hp['vocab']}; pass the model's own --tokenizer-model")
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    ids = special_ids(saved.path, saved.config)
    if UNKNOWN in vocab.types:
        w.add_unk_token_id(vocab.types.index(UNKNOWN))
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                     ("pad", w.add_pad_token_id)):
        if key in ids:
            add(int(ids[key]))
    w.add_add_bos_token(bool(ids["add_bos"]))
    w.add_add_eos_token(bool(ids["add_eos"]))


def _tensors(saved, state: dict[str, Tensor], hp: dict, float_type: str):
    """(source name, type, array, logical shape, note) of every tensor, in state order."""
    perm_heads = {"q_proj": hp["n_head"], "k_proj": hp["n_head_kv"]}
    packed_keys = {f"{n}.{s}": n for n, lay in saved.layouts.items() for s in lay.specs()}
    done = set()
    for key in state:
        if key in packed_keys:
            name = packed_keys[key]
            if name in done:
                continue
            done.add(name)
            layout = saved.layouts[name]
            packed = {s: state[f"{name}.{s}"] for s in layout.specs()}
            src, heads = f"{name}.weight", _heads(name, perm_heads)
            shape = (layout.out_features, layout.in_features)
            if layout.in_features % QK1_0 == 0:
                arr = q1_0_blocks(layout, packed)
                yield src, "Q1_0", _permute(arr, heads), shape, ""
            else:
                W = unpack(layout, packed).dequantize()  # ±α, α fp16: exact in fp16
                h = W.to(torch.float16)
                assert torch.equal(h.float(), W), "Q1_0-compatible codes must be exact in fp16"
                yield src, "F16", _permute(h.numpy(), heads), shape, (
                    f"in_features {layout.in_features} is not a multiple of {QK1_0}: "
                    "exact F16 instead of Q1_0")
            continue
        t = state[key]
        heads = _heads(key.rsplit(".", 1)[0], perm_heads)
        if t.dim() == 1 or float_type == "f32" or (float_type == "auto"
                                                   and t.dtype == torch.float32):
            arr, kind = t.to(torch.float32).numpy(), "F32"
        else:
            arr, kind = t.to(torch.float16).numpy(), "F16"
        yield key, kind, _permute(arr, heads), tuple(t.shape), ""


def _heads(module: str, perm_heads: dict[str, int]) -> int | None:
    return perm_heads.get(module.rsplit(".", 1)[-1])


def _permute(arr: np.ndarray, heads: int | None) -> np.ndarray:
    return arr if heads is None else np.ascontiguousarray(arr[qk_permutation(arr.shape[0], heads)])
