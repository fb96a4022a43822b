"""Saving and loading binarized models as ordinary Hugging Face directories.

    DIR/config.json                the model's config + quantization_config (below)
    DIR/model.safetensors          (or model-0000k-of-0000n.safetensors + an index json):
                                   packed codes `<linear>.<suffix>` (binllm.packed.formats) for
                                   every binarized linear, the other tensors unchanged
    DIR/tokenizer*, generation_config.json, binllm_report.json (the run report)

quantization_config = {quant_method: "binllm", format_version, method, method_args,
block_size, percdamp, feedback, skip, modules_to_not_convert, layers: {linear: PackedLayout},
files: {file: {bytes, sha256}}}; every shard's header records the sha256 of `layers`
(`binllm_layers_sha256`), so a layout edited after the save is refused. Saves are atomic:
everything is written into a hidden temporary directory beside DIR, which is renamed to DIR
at the very end, so an interrupted save never leaves a complete-looking DIR. Loading builds
the model skeleton with its parameters on the meta device (no full-precision weights are
ever materialised), swaps in BinaryLinears and reads the safetensors files (never pickle;
headers checked by `binllm.safetensors_io`); bad input raises a `CheckpointError` naming
the file and what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import OutputLock, atomic_dir
from ..preflight import check_config_fits
from .embedding import replace_packed, tied_heads
from .layers import BinaryLinear, set_cache_dequantized, set_kernels
from .layout import FORMAT_VERSION, PackedLayout, pack
from .output import check_output_dir
from .release import load_packed, return_freed_memory, warm_kernels
from .writer import DEFAULT_SHARD_BYTES, INDEX_FILE, SINGLE_FILE, ShardWriter  # noqa: F401
from ..safetensors_io import torch_dtype
from .saved_dir import (  # noqa: F401
    LAYERS_DIGEST_KEY,
    QUANT_METHOD,
    CheckpointError,
    CorruptCheckpoint,
    FormatVersionError,
    NotBinllmModel,
    SavedModel,
    WrongTensorShape,
    layers_digest,
    read_saved,
    read_tensors,
    sha256_file,
)

log = logging.getLogger(__name__)

REPORT_FILE = "binllm_report.json"


# -- save ------------------------------------------------------------------------------------
def save_binarized(model: nn.Module, report: Any, tokenizer: Any, out_dir: str | os.PathLike, *,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                   lock: bool = True) -> Path:
    """Write `model` (binarized in place by `binarize_model`) with the codes of `report`.

    report: the QuantizeReport (with codes); tokenizer: saved alongside when not None.
    An existing non-empty out_dir is refused unless `overwrite`, and even then unless it is a
    binllm output; the model's own source directory (or one containing it) never is replaced
    (`binllm.packed.output.check_output_dir`). lock: hold `.NAME.lock` beside out_dir while
    writing (False when the caller already holds it).
    """
    out = Path(out_dir)
    if not report.codes:
        raise ValueError("the report holds no codes: run binarize_model(..., keep_codes=True)")
    check_output_dir(out, overwrite=overwrite, sources=[_source_of(model)])
    tensors, layers, untie = _collect_tensors(model, report.codes)
    _write_dir(model, out, tensors, layers, untie, report_qc(report), tokenizer,
               report.to_dict(), max_shard_bytes, lock)
    log.info("saved %d binarized linears to %s", len(layers), out)
    return out


def save_loaded(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = True) -> Path:
    """Re-save a model loaded from a binllm directory (`binllm.load` or `from_pretrained`).

    Its BinaryLinears' packed buffers are written as they are (the same packed format) with the
    quantization_config it was loaded with; files, sizes and checksums are recomputed.
    `model.save_pretrained(DIR)` of such a model calls this. out_dir follows the rules of
    `save_binarized(..., overwrite=True)`.
    """
    out = Path(out_dir)
    loaded = getattr(model.config, "quantization_config", None)
    loaded = loaded.to_dict() if hasattr(loaded, "to_dict") else dict(loaded or {})
    layers = {n: m.layout for n, m in model.named_modules() if isinstance(m, BinaryLinear)}
    if loaded.get("quant_method") != QUANT_METHOD or not layers:
        raise ValueError("save_loaded saves models loaded from a binllm directory (BinaryLinear "
                         "layers); binarize a model first and save it with save_binarized")
    check_output_dir(out, overwrite=overwrite, sources=[_source_of(model)])
    tensors, _, _ = _collect_tensors(model, {})
    qc = {k: v for k, v in loaded.items()
          if k not in ("files", "layers", "modules_to_not_convert")}
    qc["format_version"] = FORMAT_VERSION
    report = {"resaved_from": _source_of(model), "method": qc.get("method"),
              "method_args": qc.get("method_args")}
    _write_dir(model, out, tensors, layers, False, qc, tokenizer, report, max_shard_bytes, True)
    log.info("re-saved %d binarized linears to %s", len(layers), out)
    return out


def _source_of(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    return str(name) if name else None


def report_qc(report: Any) -> dict[str, Any]:
    """The quantization_config entries a binarization report decides."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            "method": report.method, "method_args": report.method_args,
            **{k: report.config.get(k) for k in ("block_size", "percdamp", "feedback", "skip")}}


def _write_dir(model, out: Path, tensors, layers, untie, qc, tokenizer, report, max_shard_bytes,
               lock: bool) -> None:
    with OutputLock(out) if lock else contextlib.nullcontext(), atomic_dir(out) as tmp:
        files = _write_shards(tmp, tensors, layers, max_shard_bytes)
        finish_dir(tmp, model, qc, layers, files, tokenizer, report, untie)


def shard_metadata(layers: dict[str, PackedLayout]) -> dict[str, str]:
    """What every shard's header records besides the format version: the layouts digest
    (`saved_dir.layers_digest`), checked by every loader against config.json."""
    return {LAYERS_DIGEST_KEY: layers_digest(layers)}


def finish_dir(tmp: Path, model: nn.Module, qc: dict[str, Any], layers: dict[str, PackedLayout],
               files: dict[str, dict], tokenizer: Any, report: Any, untie: bool) -> None:
    """Everything of a saved directory but its shards (already in tmp, described by `files`):
    tokenizer, generation config, report, config.json with quantization_config (last)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, BinaryLinear))]
    qc = {**qc, "modules_to_not_convert": [n for n in linears if n not in layers],
          "layers": {n: lay.to_dict() for n, lay in layers.items()}, "files": files}
    tied = tied_heads(model)  # an lm_head computing from the packed embedding table
    if tied:
        qc["tied_heads"] = tied
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(tmp)
    _write_json(tmp / REPORT_FILE, report)
    config = model.config.to_diff_dict()
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = qc
    if untie:  # a binarized linear was tied to a kept tensor: both are stored on their own
        config["tie_word_embeddings"] = False
    _write_json(tmp / "config.json", config)  # last: only a finished dir has a binllm config
    for f in tmp.iterdir():
        f.chmod(0o644)


def _save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None,
                     max_shard_size: int | str = DEFAULT_SHARD_BYTES, push_to_hub: bool = False,
                     **kwargs) -> None:
    """`model.save_pretrained(DIR)` of a loaded binllm model: `save_loaded` (packed format)."""
    if push_to_hub:
        raise NotImplementedError("push_to_hub: save_pretrained(DIR) first, then upload DIR with "
                                  "huggingface_hub's upload_folder")
    if state_dict is not None:
        raise ValueError("a binllm model saves its own packed state; drop state_dict=")
    if not is_main_process:
        return
    if isinstance(max_shard_size, str):
        from transformers.utils.hub import convert_file_size_to_int

        max_shard_size = convert_file_size_to_int(max_shard_size)
    save_loaded(self, save_directory, max_shard_bytes=int(max_shard_size))


def bind_save_pretrained(model: nn.Module) -> nn.Module:
    """Make `model.save_pretrained` write the packed format (an instance method; copies keep it)."""
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    return model


def _collect_tensors(model: nn.Module, codes: dict[str, Any]):
    """Tensors to store in state_dict order: packed codes in place of binarized weights."""
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    layers: dict[str, PackedLayout] = {}
    weight_of = {f"{name}.weight": name for name in codes}
    missing = sorted(set(weight_of) - set(state))
    if missing:
        raise ValueError(f"the report's codes name linears the model does not have: {missing[:3]}")
    def ident(t: Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())

    binarized = {ident(state[k]) for k in weight_of}
    seen: set[tuple] = set()
    untie = False
    for key, t in state.items():
        if t.device.type == "meta":
            raise ValueError(f"{key} is on the meta device; save a model whose weights are loaded")
        if key in weight_of:
            name = weight_of[key]
            layout, packed = pack(codes[name])
            if (layout.out_features, layout.in_features) != tuple(t.shape):
                raise ValueError(f"{name}: codes of shape {codes[name].shape} for a weight "
                                 f"{tuple(t.shape)}")
            layers[name] = layout
            tensors.update({f"{name}.{s}": v.detach().cpu() for s, v in packed.items()})
            continue
        if ident(t) in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen.add(ident(t))
        untie |= ident(t) in binarized
        tensors[key] = t.detach().cpu().contiguous()
    for name, m in model.named_modules():  # packed already: a PackedEmbedding, a packed head
        if isinstance(m, BinaryLinear) and name not in layers:
            layers[name] = m.layout
    return tensors, layers, untie


def _write_shards(tmp: Path, tensors: dict[str, Tensor], layers: dict[str, PackedLayout],
                  max_bytes: int) -> dict[str, dict]:
    writer = ShardWriter(tmp, max_bytes)
    try:
        for key, t in tensors.items():
            writer.add(key, t)
        return writer.close(shard_metadata(layers))
    finally:
        writer.abort()


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


# -- load --------------------------------------------------------------------------------------
@contextlib.contextmanager
def parameters_on_meta():
    """Create every nn.Parameter on the meta device while the block runs (buffers stay real).

    Non-persistent buffers (rotary inv_freq) are computed at construction and not saved, so
    they must be real; parameters are filled from the checkpoint, so they need no memory.
    A scoped patch of nn.Module.register_parameter, always restored (process-wide while it
    lasts: build nothing else concurrently in other threads).
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_binarized(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None, verify: bool = True,
                   cache_dequantized: bool = False, kernels: bool = True,
                   keep_packed: bool = False) -> nn.Module:
    """The binarized model saved in `path`, with BinaryLinears computing from packed codes.

    dtype casts the unchanged floating tensors (embeddings, norms, biases); packed scales keep
    their stored dtype (fp16 or fp32). verify: check the files' sha256 against the values
    recorded at save time. kernels: compute from the packed bits with the fast kernels (the
    default; equal to the reference to fp32 round-off) or, False, dequantize at every forward
    (bit for bit the calibrated model); cache_dequantized keeps dequantized weights instead.
    Each layer's kernel form is derived here, one layer at a time, and its packed tensors are
    then released, read back from the still-open shard (digest-checked) where needed
    (`binllm.packed.source`); keep_packed=True keeps them in memory beside the form instead.
    """
    saved = read_saved(path, verify=verify)
    # before the skeleton: a config.json whose shape the files cannot back is refused here
    check_config_fits(saved.config, str(saved.path), bytes_per_parameter=1 / 8,
                      stored_bytes=sum(f.stat().st_size for f in saved.files))
    model, quantization = _skeleton(saved)
    set_cache_dequantized(model, cache_dequantized)
    set_kernels(model, kernels)
    packed = {f"{n}.{s}" for n, lay in saved.layouts.items() for s in lay.specs()}
    state = read_tensors(saved, set(saved.tensors) - packed)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    load_packed(model, saved, keep_packed=keep_packed)
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CorruptCheckpoint(f"{saved.path} does not store {left[:4]} and they are not tied to "
                                "a stored tensor; the save is incomplete")
    model.config.quantization_config = quantization
    model.eval().to(device)
    if dtype is not None:
        model.to(dtype)
    warm_kernels(model)
    return_freed_memory()
    return bind_save_pretrained(model)


def _skeleton(saved: SavedModel) -> tuple[nn.Module, Any]:
    """The model of saved.config with parameters on meta and BinaryLinears swapped in, checked
    against the files (check_model_matches); and the quantization_config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(saved.path)
    quantization = config.quantization_config
    del config.quantization_config  # build the plain architecture; BinaryLinears go in below
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    replace_packed(model, saved.layouts, saved.quantization.get("tied_heads"), device="meta")
    check_model_matches(saved, model)
    return model, quantization


@dataclass(frozen=True)
class Verification:
    """What `verify_saved` checked (`binllm inspect --verify` prints it)."""

    shards: int       # safetensors files whose size and sha256 match the values recorded at save
    linears: int      # binarized linears, every packed tensor present with its shape and dtype
    tensors: int      # stored tensors, all expected by the model built from config.json

    def summary(self) -> str:
        return (f"{self.shards} shard{'s' * (self.shards != 1)}, {self.linears} binarized "
                f"linears, {self.tensors} tensors: sizes and sha256 checksums match the save, "
                "every tensor present with its declared shape and dtype")


def verify_saved(path: str | os.PathLike) -> Verification:
    """Every check of load_binarized (sha256 of each shard included), loading no tensor data."""
    saved = read_saved(path, verify=True)
    _skeleton(saved)
    return Verification(len(saved.files), len(saved.layouts), len(saved.tensors))


def read_verified(path: str | os.PathLike) -> SavedModel:
    """The directory as `read_saved` reads it, after every check load_binarized makes before
    it reads tensor data: the shards' sizes and sha256, config.json's shape against the files
    (`check_config_fits`) and the model it builds against the stored tensors
    (`check_model_matches`). For readers of the files other than load_binarized (export)."""
    saved = read_saved(path, verify=True)
    check_config_fits(saved.config, str(saved.path), bytes_per_parameter=1 / 8,
                      stored_bytes=sum(f.stat().st_size for f in saved.files))
    _skeleton(saved)
    return saved


def load(path: str | os.PathLike, **kwargs) -> nn.Module:
    """`binllm.load(DIR)`: see load_binarized."""
    return load_binarized(path, **kwargs)


def check_model_matches(saved: SavedModel, model: nn.Module) -> None:
    """The checks both loaders run on the skeleton (BinaryLinears swapped in, nothing loaded):
    every tensor the model needs is stored with its declared shape (and, for packed tensors,
    dtype), none is left over, and every linear whose packed codes are stored has a layout."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    _check_shapes(saved, model.state_dict(), tied)


def _check_shapes(saved: SavedModel, expected: dict[str, Tensor], tied: set[str]) -> None:
    packed = {f"{n}.{s}" for n, lay in saved.layouts.items() for s in lay.specs()}
    extra = sorted(set(saved.tensors) - set(expected))
    missing = sorted(set(expected) - set(saved.tensors) - tied)
    owners = {k.rpartition(".")[0] for k in extra}
    unlisted = sorted(k.rpartition(".")[0] for k in missing
                      if k.endswith(".weight") and k.rpartition(".")[0] in owners)
    if unlisted:
        raise CorruptCheckpoint(f"{saved.path}: the files store packed codes of {unlisted[:4]} "
                                "but config.json's quantization_config.layers has no layout for "
                                f"{'it' if len(unlisted) == 1 else 'them'}; config.json is "
                                "damaged: restore it or re-save the model")
    if extra or missing:
        raise CorruptCheckpoint(f"{saved.path}: the files store tensors the model built from "
                                f"config.json lacks {extra[:4]} or miss tensors it needs "
                                f"{missing[:4]}; the directory is inconsistent")
    for key, st in saved.tensors.items():
        exp = expected[key]
        wrong_dtype = key in packed and torch_dtype(st.dtype, WrongTensorShape) != exp.dtype
        if st.shape != tuple(exp.shape) or wrong_dtype:
            raise WrongTensorShape(f"{saved.path / st.file}: tensor {key} is {st.dtype} "
                                   f"{st.shape}, "
                                   f"config.json declares {exp.dtype} {tuple(exp.shape)}; the "
                                   "file does not belong to this config (re-save the model)")
