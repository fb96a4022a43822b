"""Reading a saved binllm directory without loading the model: config, headers, inspection.

`read_saved(DIR)` checks config.json, the format version, the file names it lists (plain
names inside DIR, before anything is opened) and every safetensors header
(`binllm.safetensors_io`: length, dtypes, shapes, offsets; the file size recorded at save
time; with `verify`, the sha256; the layouts digest each shard records) and returns what is
stored where, touching no tensor data. `inspect_saved(DIR)` measures the
stored bits of every binarized linear from those headers and reads its codes for the
paper-style count (`binllm inspect`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..methods.codes import per_weight
from .layout import FORMAT_VERSION, PackedLayout, unpack
from .packing import PackingError
from ..errors import BinllmError
from ..safetensors_io import DTYPES, TensorEntry, check_name, read_header
from ..safetensors_io import read_tensors as read_entries

QUANT_METHOD = "binllm"
LAYERS_DIGEST_KEY = "binllm_layers_sha256"   # in every shard's __metadata__


class CheckpointError(BinllmError, ValueError):
    """A directory binllm cannot load as a binarized model."""


class NotBinllmModel(CheckpointError):
    """The directory holds no model, or a model not written by binllm."""


class FormatVersionError(CheckpointError):
    """The directory was written in a format_version this binllm does not read."""


class CorruptCheckpoint(CheckpointError):
    """A truncated, damaged or inconsistent file."""


class WrongTensorShape(CheckpointError):
    """A stored tensor whose shape or dtype differs from what the config declares."""



@dataclass(frozen=True)
class StoredTensor:
    file: str
    dtype: str          # safetensors dtype code: U8, F16, F32, …
    shape: tuple[int, ...]
    nbytes: int         # bytes of data in the file
    offset: int         # absolute byte offset of the data in the file


@dataclass(frozen=True)
class SavedModel:
    """A binllm directory, read and checked without touching tensor data."""

    path: Path
    config: dict[str, Any]
    quantization: dict[str, Any]
    layouts: dict[str, PackedLayout]
    tensors: dict[str, StoredTensor]

    @property
    def files(self) -> list[Path]:
        return [self.path / f for f in sorted({t.file for t in self.tensors.values()})]


def read_saved(path: str | os.PathLike, verify: bool = False) -> SavedModel:
    """Config, layouts and every stored tensor's header entry; `verify` also hashes the files.

    The names in quantization_config.files are checked (plain file names in `path`) before
    any file is opened; every shard's header is read by `binllm.safetensors_io`, and the
    layouts digest a shard records (`LAYERS_DIGEST_KEY`) must match config.json's layouts."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise NotBinllmModel(f"{path} has no config.json: it is not a model directory (a binllm "
                             "model is written by `binllm quantize MODEL --method … --out DIR`)")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{cfg_file} is not valid JSON ({e}); the save was "
                                "damaged") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        found = qc.get("quant_method") if isinstance(qc, dict) else None
        raise NotBinllmModel(
            f"{path} is not a binllm model (quantization_config.quant_method = {found!r}); "
            f"binarize it first with `binllm quantize {path} --method … --out DIR`")
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        advice = "upgrade binllm to read it" if newer else "re-quantize the model with this binllm"
        raise FormatVersionError(f"{path} is binllm format_version {version!r}; this binllm reads "
                                 f"format_version {FORMAT_VERSION}: {advice}")
    try:
        layouts = {n: PackedLayout.from_dict(d) for n, d in qc["layers"].items()}
    except (KeyError, AttributeError, PackingError) as e:
        raise CorruptCheckpoint(f"{cfg_file}: bad quantization_config.layers ({e})") from None
    files = qc.get("files") or {}
    if not files or not isinstance(files, dict) or \
            not all(isinstance(info, dict) for info in files.values()):
        raise CorruptCheckpoint(f"{cfg_file} lists no weight files (quantization_config.files)")
    for name in files:  # every name, before any file is opened or hashed
        check_name(name, f"{cfg_file} (quantization_config.files)", CorruptCheckpoint,
                   plain=True)
    digest = layers_digest(layouts)
    tensors: dict[str, StoredTensor] = {}
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{f} is missing; copy the whole directory or re-save "
                                    "the model")
        if f.stat().st_size != info.get("bytes"):
            raise CorruptCheckpoint(f"{f} has {f.stat().st_size} bytes, the save wrote "
                                    f"{info.get('bytes')}: the file is truncated or was replaced")
        if verify and sha256_file(f) != info.get("sha256"):
            raise CorruptCheckpoint(f"{f} does not match the checksum recorded at save time: "
                                    "the file is corrupt; re-save or re-download the model")
        for key, e in _read_header(f, digest).items():
            if key in tensors:
                raise CorruptCheckpoint(f"tensor {key} is stored twice "
                                        f"({tensors[key].file}, {name})")
            tensors[key] = StoredTensor(name, e.dtype, e.shape, e.nbytes, e.offset)
    return SavedModel(path, config, qc, layouts, tensors)


def layers_digest(layouts: Mapping[str, PackedLayout]) -> str:
    """sha256 of quantization_config.layers as the loader reads them (canonical JSON): every
    shard records it at save (`LAYERS_DIGEST_KEY`), so an edited layout is refused."""
    text = json.dumps({n: lay.to_dict() for n, lay in layouts.items()}, sort_keys=True,
                      separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_header(f: Path, digest: str) -> dict[str, TensorEntry]:
    """{key: entry} of a binllm shard (`binllm.safetensors_io.read_header`), its format version
    and recorded layouts digest checked (shards saved before the digest existed have none)."""
    header = read_header(f, CorruptCheckpoint)
    meta = header.metadata
    if meta.get("binllm_format_version") != str(FORMAT_VERSION):
        raise FormatVersionError(f"{f} carries binllm_format_version "
                                 f"{meta.get('binllm_format_version')!r}, this binllm reads "
                                 f"{FORMAT_VERSION}")
    recorded = meta.get(LAYERS_DIGEST_KEY)
    if recorded is not None and recorded != digest:
        raise CorruptCheckpoint(f"{f.parent / 'config.json'}: quantization_config.layers differs "
                                f"from the layouts {f.name} was saved with (their sha256 does "
                                "not match the one recorded in its header): config.json was "
                                "edited after the save; restore it or re-save the model")
    return header.tensors


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_tensors(saved: SavedModel, keys: set[str] | None = None) -> dict[str, Tensor]:
    """The stored tensors (all, or `keys`), read at the offsets of their checked headers."""
    state = {}
    for f in saved.files:
        wanted = {k: TensorEntry(t.dtype, t.shape, t.offset, t.nbytes)
                  for k, t in saved.tensors.items()
                  if t.file == f.name and (keys is None or k in keys)}
        if wanted:
            state.update(read_entries(f, wanted, CorruptCheckpoint))
    return state


# -- inspection --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerInspection:
    name: str
    format: str
    shape: tuple[int, int]   # (out_features, in_features)
    stored_bytes: int        # bytes of the layer's packed tensors in the files
    stored_bits: float       # per weight, measured from the file headers
    codes_bits: float        # per weight, the codes' own accounting (codes.stored_bits())
    paper_bits: float        # per weight, as the papers count (codes.paper_bits())


@dataclass(frozen=True)
class Inspection:
    path: str
    method: str
    method_args: dict[str, Any]
    format_version: int
    layers: list[LayerInspection]
    file_bytes: int          # every safetensors file, headers included
    other_bytes: int         # unchanged tensors (embeddings, norms, lm_head, biases)
    fp16_bytes: int          # the same model with every tensor in fp16

    @property
    def stored_bits(self) -> float:
        return per_weight(self.layers, "stored_bits")

    @property
    def paper_bits(self) -> float:
        return per_weight(self.layers, "paper_bits")

    @property
    def codes_bits(self) -> float:
        return per_weight(self.layers, "codes_bits")

    @property
    def file_bits(self) -> float:
        """Bits of the whole files per model parameter (every tensor, headers included)."""
        return self.file_bytes * 8 / max(self.fp16_bytes // 2, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(stored_bits=self.stored_bits, paper_bits=self.paper_bits,
                 codes_bits=self.codes_bits, file_bits=self.file_bits,
                 size_vs_fp16=self.file_bytes / max(self.fp16_bytes, 1))
        return d


def inspect_saved(path: str | os.PathLike, verify: bool = False) -> Inspection:
    """Per binarized linear: stored bits measured on disk, the codes' accounting, paper bits."""
    saved = read_saved(path, verify=verify)
    layers, packed_keys = [], set()
    for name, layout in saved.layouts.items():
        keys = {f"{name}.{s}" for s in layout.specs()}
        packed_keys |= keys
        nbytes = sum(saved.tensors[k].nbytes for k in keys if k in saved.tensors)
        tensors = read_tensors(saved, keys)
        try:
            codes = unpack(layout, {k.rpartition(".")[2]: v for k, v in tensors.items()})
        except PackingError as e:
            raise CorruptCheckpoint(f"{saved.path}: layer {name}: {e}") from None
        n = layout.out_features * layout.in_features
        layers.append(LayerInspection(name, layout.format,
                                      (layout.out_features, layout.in_features), nbytes,
                                      nbytes * 8 / n, codes.stored_bits() / n, codes.paper_bits()))
    other = {k: t for k, t in saved.tensors.items() if k not in packed_keys}
    fp16 = sum(t.nbytes // DTYPES[t.dtype].itemsize * 2 for t in other.values()) \
        + sum(lay.shape[0] * lay.shape[1] * 2 for lay in layers)
    q = saved.quantization
    return Inspection(str(saved.path), str(q.get("method")), dict(q.get("method_args") or {}),
                      int(q["format_version"]), layers,
                      sum(f.stat().st_size for f in saved.files),
                      sum(t.nbytes for t in other.values()), fp16)
