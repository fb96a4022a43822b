"""Binarize a model larger than memory: decoder layers streamed from its safetensors shards.

    model, ckpt = open_streaming(DIR)           # skeleton on meta; embeddings, norm, head loaded
    report = binarize_streaming(model, ckpt, QuantizeConfig("billm"), calib, out="out/billm")

`open_streaming` builds the model from `config.json` with every parameter on the meta device
(`parameters_on_meta`; buffers such as rotary frequencies are computed as usual), then reads
the tensors outside the decoder layers (embeddings, final norm, lm_head unless it is tied to
the embeddings) from the shards named by `model.safetensors.index.json` (or the single
`model.safetensors`). Every shard's header is checked against its size and every parameter
key is looked up before any work starts, so a missing shard, a truncated shard or a key in no
shard is refused at once (`BadCheckpoint`, which the CLI reports in one line).

`binarize_streaming` runs `binarize_model` with a `LayerStream` as its layer source: before
its turn, decoder layer i is read from the shards (only that layer's keys, plain reads at
the header's offsets); once quantized and run on the calibration windows, its linears become
`BinaryLinear`s holding the packed codes, its tensors go to the output writer
(`binllm.packed.writer.ShardWriter`, inside a hidden directory renamed at the end), and its
dense weights are dropped. With `keep_packed` the packed layer stays in the model, so the
result is the model `binllm.load(out)` would give (perplexity from packed layers); without
it the layer goes back to the meta device. At most one decoder layer is dense at a time.
Once layer 0's inputs are captured only decoder layers run, so the tensors outside them go
to the meta device too (`drop_outside`) and are read back from the shards at the end
(`load_outside`: for the writer's final norm and lm_head, and with keep_packed for the
model); on a 128k-vocabulary 70B model that is 4 GiB not held while the layers are solved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import OutputLock, atomic_dir
from ..packed.checkpoint import finish_dir, parameters_on_meta, report_qc, shard_metadata
from ..packed.output import check_output_dir
from ..packed.embedding import outside_layouts
from ..packed.layers import BinaryLinear
from ..packed.saved_dir import CheckpointError
from ..packed.writer import DEFAULT_SHARD_BYTES, ShardWriter
from ..preflight import check_config_fits
from ..safetensors_io import (INDEX_FILE, SINGLE_FILE, TensorEntry, open_checkpoint,
                              read_tensors, torch_dtype)
from .binarize import QuantizeReport, binarize_model
from .checks import refuse_non_finite
from .config import QuantizeConfig
from .distributed import Distributed, guard
from .outside import quantize_outside
from .walker import find_decoder_layers, outside_modules

log = logging.getLogger(__name__)


class BadCheckpoint(CheckpointError):
    """The checkpoint to binarize is damaged or incomplete (missing shard, truncated, key
    absent)."""


class NotStreamable(Exception):
    """The checkpoint cannot be streamed (no safetensors, other key names): load it whole."""


class SafetensorsCheckpoint:
    """A local safetensors checkpoint: which file holds which key, headers checked, no data read
    (`binllm.safetensors_io.open_checkpoint`: index names inside the directory, offsets,
    dtypes and shapes of every shard)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        found = open_checkpoint(self.path, BadCheckpoint)
        if found is None:
            raise NotStreamable(f"{self.path} holds no {SINGLE_FILE} or {INDEX_FILE}")
        self.shards = found
        self.entries: dict[str, tuple[str, TensorEntry]] = found.entries  # key: (file, entry)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def first_float_dtype(self) -> torch.dtype | None:
        for _, entry in self.entries.values():
            dtype = torch_dtype(entry.dtype, BadCheckpoint)
            if dtype.is_floating_point:
                return dtype
        return None

    def read(self, keys: list[str]) -> dict[str, Tensor]:
        """The tensors `keys`, read from their files into fresh CPU tensors (only those bytes,
        plain reads: `binllm.safetensors_io.read_tensors`)."""
        by_file: dict[str, dict[str, TensorEntry]] = {}
        for key in keys:
            if key not in self.entries:
                raise BadCheckpoint(f"{key} is in no shard of {self.path}; the checkpoint is "
                                    "incomplete (re-download it)")
            name, entry = self.entries[key]
            by_file.setdefault(name, {})[key] = entry
        out = {}
        for name, wanted in by_file.items():
            out.update(read_tensors(self.path / name, wanted, BadCheckpoint))
        return {key: out[key] for key in keys}


def resolve_dtype(config: Any, ckpt: SafetensorsCheckpoint, dtype: str | torch.dtype | None):
    """The dtype from_pretrained(dtype=...) would give: "auto" = config.dtype, else the stored
    one."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        found = getattr(config, "dtype", None)
        if isinstance(found, str):
            found = getattr(torch, found, None)
        return found if isinstance(found, torch.dtype) else (ckpt.first_float_dtype()
                                                             or torch.float32)
    return getattr(torch, dtype)


def _load_into(module: nn.Module, ckpt: SafetensorsCheckpoint, prefix: str, keys: list[str]):
    """Read `keys` (relative to module, `prefix` + key in the checkpoint) into module, in the
    dtype of the tensors they replace (assign: the meta tensors are swapped for real ones)."""
    current = module.state_dict()
    stored = ckpt.read([prefix + k for k in keys])
    state = {}
    for k in keys:
        t, want = stored[prefix + k], current[k]
        state[k] = t.to(want.dtype) if t.is_floating_point() and want.is_floating_point() else t
    module.load_state_dict(state, strict=False, assign=True)


def open_streaming(path: str | os.PathLike, dtype: str | torch.dtype | None = "auto", *,
                   tail: bool = True):
    """(model skeleton, checkpoint): decoder layers on meta, every other tensor loaded (tail
    False: not those after the layers, the final norm and an untied lm_head, which only a
    forward through the whole model needs; they are read one at a time and checked for
    NaN/Inf now, and `binarize_streaming` reads them back at the end)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    ckpt = SafetensorsCheckpoint(path)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        raise NotStreamable(f"{path} is a quantized checkpoint")
    # before the skeleton: a config.json whose shape the files cannot back is refused here (the
    # layers are streamed, so the whole model need not fit in memory: no memory estimate)
    check_config_fits(config, str(path), bytes_per_parameter=None,
                      stored_bytes=ckpt.shards.total_bytes)
    torch_dtype = resolve_dtype(config, ckpt, dtype)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    layers_path, _ = find_decoder_layers(model)
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    params = [k for k, _ in model.named_parameters(remove_duplicate=False) if k not in tied]
    missing = [k for k in params if k not in ckpt]
    if missing and len(missing) == len(params):
        raise NotStreamable(f"{path}: none of {type(model).__name__}'s parameter names is in "
                            "the checkpoint (another naming); it is loaded whole")
    unknown = sorted(set(ckpt.entries) - set(model.state_dict()))
    if missing and unknown:  # renamed on load by transformers (GPT-NeoX: embed_out = lm_head)
        raise NotStreamable(f"{path}: {missing[0]} is stored under another name (the checkpoint "
                            f"holds {unknown[0]}, which the model has not); it is loaded whole")
    check_against_config(model, ckpt)
    if missing:
        raise BadCheckpoint(f"{missing[0]} is in no shard of {path}"
                            f"{f' (nor {len(missing) - 1} more keys)' if len(missing) > 1 else ''}"
                            "; the checkpoint is incomplete (re-download it)")
    later = load_outside(model, ckpt, tail=tail)
    for key in sorted(later):  # not kept, but checked now as check_finite checks the rest
        refuse_non_finite(key, ckpt.read([key])[key])
    left = [n for n, p in model.named_parameters()
            if p.is_meta and not n.startswith(layers_path + ".") and n not in later]
    if left:
        raise BadCheckpoint(f"{path}: {left[0]} is neither stored nor tied to a stored tensor")
    return model, ckpt


def check_against_config(model: nn.Module, ckpt: SafetensorsCheckpoint) -> None:
    """Before any tensor is read: every stored tensor the skeleton built from config.json has
    is stored with its shape, and the checkpoint stores nothing the skeleton lacks (a layer
    beyond num_hidden_layers) but what transformers' loader ignores too (the model's
    `_keys_to_ignore_on_load_unexpected`, legacy rotary inv_freq and position_ids)."""
    expected = model.state_dict()
    disagree = f"{ckpt.path}: config.json and the weights disagree"
    for key, t in expected.items():
        if key in ckpt:
            name, entry = ckpt.entries[key]
            if tuple(t.shape) != entry.shape:
                raise BadCheckpoint(f"{disagree}: {key} is {tuple(t.shape)} by config.json, "
                                    f"{entry.shape} in {name}; restore the model's own "
                                    "config.json")
    ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [n for n, _ in model.named_buffers()]
    if any(n.endswith("rotary_emb.inv_freq") for n in buffers):
        ignored.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        ignored.add(r"(^|\.)position_ids$")
    pattern = re.compile("|".join(f"({p})" for p in ignored)) if ignored else None
    unknown = [k for k in ckpt.entries if k not in expected
               and not (pattern and pattern.search(k))]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise BadCheckpoint(f"{disagree}: {ckpt.entries[unknown[0]][0]} stores {unknown[0]}{more}, "
                            f"which the {type(model).__name__} built from config.json has not; "
                            "restore the model's own config.json")


def load_outside(model: nn.Module, ckpt: SafetensorsCheckpoint, tail: bool = True) -> set[str]:
    """Read the tensors outside the decoder layers (embeddings, final norm, lm_head) from
    `ckpt` into `model`, then tie the weights the config ties. tail False: only those before
    the layers (in state_dict order); returns the keys left out."""
    inside = find_decoder_layers(model)[0] + "."
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    keys, later, reached = [], set(), False
    for k in model.state_dict():
        reached = reached or k.startswith(inside)
        if not k.startswith(inside) and k not in tied and k in ckpt:
            (later.add if reached and not tail else keys.append)(k)
    _load_into(model, ckpt, "", keys)
    model.tie_weights()
    return later


def drop_outside(model: nn.Module) -> None:
    """Put the parameters outside the decoder layers on the meta device (buffers such as
    rotary frequencies stay): once layer 0's inputs are captured only decoder layers run, so
    the embeddings and lm_head need not be held while the layers are binarized."""
    for m in outside_modules(model, find_decoder_layers(model)[1]):
        for name, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """glibc only: serve every allocation of at least `threshold` bytes with its own mapping, so
    a freed layer's buffers go back to the OS at once. By default glibc raises that threshold
    after each large free (up to 32 MiB), and the layer-sized tensors freed after every layer
    then stay in its heap; on the 2 GB benchmark model this kept peak RSS growing layer after
    layer. Process-wide and permanent (the CLI calls it; a library caller may too, or set
    MALLOC_MMAP_THRESHOLD_). Returns whether it was applied."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


class LayerStream:
    """The walker's layer source: load layer i from the checkpoint, pack it, write it, drop it."""

    def __init__(self, ckpt: SafetensorsCheckpoint, writer: ShardWriter | None = None,
                 keep_packed: bool = True):
        self.ckpt, self.writer, self.keep_packed = ckpt, writer, keep_packed
        self.layouts: dict[str, Any] = {}      # full linear name -> PackedLayout, in order
        self._codes: dict[int, dict[str, Any]] = {}

    def captured(self, model: nn.Module) -> None:
        """Layer 0's inputs exist: drop the embeddings, final norm and lm_head until the end
        (`binarize_streaming` reads them back for the writer and for keep_packed)."""
        drop_outside(model)

    def load(self, i: int, path: str, layer: nn.Module) -> None:
        keys = list(layer.state_dict())
        params = {k for k, _ in layer.named_parameters()}
        absent = [k for k in params if f"{path}.{k}" not in self.ckpt]
        if absent:
            raise BadCheckpoint(f"{path}.{absent[0]} is in no shard of {self.ckpt.path}; the "
                                "checkpoint is incomplete (re-download it)")
        _load_into(layer, self.ckpt, path + ".", [k for k in keys if f"{path}.{k}" in self.ckpt])

    def set_codes(self, i: int, codes: dict[str, Any]) -> None:
        """The stored codes of layer i's linears, {name relative to the layer: codes}; they
        are packed when the layer is released."""
        self._codes.setdefault(i, {}).update(codes)

    def add_codes(self, i: int, name: str, codes: Any, bias: Tensor | None) -> None:
        """One linear's stored codes, packed at once (a bit or so per weight instead of the
        codes' bytes per weight); the BinaryLinear takes the linear's place at release."""
        self._codes.setdefault(i, {})[name] = _packed(codes, bias)

    def release(self, i: int, path: str, layer: nn.Module) -> None:
        for name, codes in self._codes.pop(i, {}).items():
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            old = getattr(parent, child)
            new = codes if isinstance(codes, BinaryLinear) else _packed(codes, old.bias)
            new = new.to(old.weight.device)
            setattr(parent, child, new)
            self.layouts[f"{path}.{name}"] = new.layout
        if self.writer is not None:
            for key, t in layer.state_dict(prefix=path + ".").items():
                self.writer.add(key, t)
        if not self.keep_packed:
            layer.to("meta")


def _packed(codes: Any, bias: Tensor | None) -> BinaryLinear:
    # the reference dequantize path: the model computes exactly the calibrated weights, so a
    # perplexity from it equals the in-memory path's (load(out) may use kernels)
    return BinaryLinear.from_codes(codes, bias, kernels=False)


def _outside_tensors(model: nn.Module) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """Tensors outside the decoder layers in state_dict order, tied ones once: (before, after).
    Ties are told by storage, so only loaded tensors count (every meta tensor's is 0)."""
    layers_path, _ = find_decoder_layers(model)
    before, after, seen = [], [], set()
    reached = False
    for key, t in model.state_dict().items():
        if key.startswith(layers_path + "."):
            reached = True
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if ident in seen:  # lm_head tied to embed_tokens: stored once, as save_binarized does
            continue
        seen.add(ident)
        (after if reached else before).append((key, t))
    return before, after


def _write(writer: ShardWriter, tensors: list[tuple[str, Tensor]]) -> None:
    for key, t in tensors:
        writer.add(key, t)


def binarize_streaming(model: nn.Module, ckpt: SafetensorsCheckpoint, config: QuantizeConfig,
                       calibration: list[Tensor], *, out: str | os.PathLike | None = None,
                       tokenizer: Any = None, overwrite: bool = False, keep_packed: bool = True,
                       lock: bool = True, dist: Distributed | None = None,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       **binarize_kwargs: Any) -> QuantizeReport:
    """binarize_model with the decoder layers streamed from `ckpt`; `out` is written as the
    layers finish (the same directory save_binarized writes, published atomically at the end).

    binarize_kwargs: device, on_layer, journal (as binarize_model). The report keeps no codes
    (they are in `out`, and with keep_packed in the model's BinaryLinears). `out` follows
    save_binarized's rules (`check_output_dir`); lock: hold its lock (False: the caller does).
    dist: this rank of a torchrun group (binarize_model's `dist`); every rank streams the
    layers from the same checkpoint, rank 0 alone passes `out` (and the journal). Opening
    the output is agreed like every other step, so a refusal on rank 0 stops every rank.
    """
    if config.lm_head != "keep":
        load_outside(model, ckpt)  # the head is quantized with the embeddings, before the layers
    outside = quantize_outside(model, config.embeddings, config.lm_head)
    with contextlib.ExitStack() as stack:
        writer = None
        with guard(dist, "output directory"):
            if out is not None:
                out = Path(out)
                check_output_dir(out, overwrite=overwrite, sources=[ckpt.path])
                if lock:
                    stack.enter_context(OutputLock(out))
                tmp = stack.enter_context(atomic_dir(out))  # removed unless all succeeds
                writer = ShardWriter(tmp, max_shard_bytes)
                stack.callback(writer.abort)
                # the embeddings are written now and no reference is kept (they are dropped
                # after the capture); the tail once it is read back at the end
                _write(writer, _outside_tensors(model)[0])
        stream = LayerStream(ckpt, writer, keep_packed)
        report = binarize_model(model, config, calibration, keep_codes=False, source=stream,
                                dist=dist, **binarize_kwargs)
        report.outside = outside
        if writer is not None or keep_packed:
            load_outside(model, ckpt)  # what the layers ran without: the head, the final norm
        if writer is not None:  # read back: tied tensors are told apart by their storage
            _write(writer, _outside_tensors(model)[1])
            if not keep_packed:
                drop_outside(model)
            layouts = {**outside_layouts(model, find_decoder_layers(model)[0]), **stream.layouts}
            files = writer.close(shard_metadata(layouts))
            finish_dir(tmp, model, report_qc(report), layouts, files, tokenizer,
                       report.to_dict(), untie=False)
            log.info("streamed %d binarized linears to %s", len(stream.layouts), out)
    return report
