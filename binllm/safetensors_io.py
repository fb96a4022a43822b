"""Reading safetensors checkpoints: the one header parser, its checks, dtypes and shard names.

Every path that reads a safetensors file goes through here: the streamed quantization
(`binllm.engine.stream`), the loaders of saved directories (`binllm.packed.saved_dir`, and
through it `binllm.load`, `from_pretrained` and `inspect`), the released-codes source
(`binllm.packed.source`) and the size checks before a load (`binllm.preflight`).

- `read_header(file)`: the header of one file (https://github.com/huggingface/safetensors,
  "Format": an 8-byte little-endian length, a JSON object {key: {dtype, shape, data_offsets}}
  with an optional `__metadata__` of strings, then the data area), checked before any tensor
  byte is read: a header length the file can hold (at most `MAX_HEADER_BYTES`, safetensors'
  own limit), JSON without duplicate keys, known dtypes, shapes whose element count times
  the dtype's size is the tensor's byte length, and data offsets that, sorted, follow each
  other without gap or overlap from 0 to the end of the file. Offsets are returned absolute.
- `check_name(name, source)`: a file name read from an index or a config, checked as a name
  (relative, no `..` part, no drive or root), never by resolving it: the shards of a Hugging
  Face cache snapshot are symlinks into its blob store and keep working.
- `open_checkpoint(dir)`: the files of a checkpoint (`model.safetensors.index.json`'s
  weight map, names checked, or the single `model.safetensors`), every header read, and the
  index cross-checked against the headers: {key: (file, entry)}.
- `read_tensors(file, entries)`: the tensors, read with plain reads at their offsets.
- `DTYPES`, `torch_dtype(code)`, `dtype_code(torch_dtype)`: safetensors' dtype names.

Each function takes the `error` class to raise (a `BinllmError`, so the CLI reports it in
one line); the message names the file and, where one is at fault, the tensor. Only the
standard library at import time (torch on first use of a tensor); imports `binllm.errors`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .errors import BinllmError

MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers too
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
REPAIR = "re-download or re-save it"


class SafetensorsError(BinllmError, ValueError):
    """A safetensors file or index that cannot be read as it claims (damaged, inconsistent, or
    naming a file outside its directory)."""


@dataclass(frozen=True)
class DType:
    itemsize: int
    torch_name: str     # the attribute of torch holding it


# safetensors' dtype names, as its headers write them
DTYPES = {"F64": DType(8, "float64"), "F32": DType(4, "float32"), "F16": DType(2, "float16"),
          "BF16": DType(2, "bfloat16"), "I64": DType(8, "int64"), "I32": DType(4, "int32"),
          "I16": DType(2, "int16"), "I8": DType(1, "int8"), "U8": DType(1, "uint8"),
          "BOOL": DType(1, "bool"), "U16": DType(2, "uint16"), "U32": DType(4, "uint32"),
          "U64": DType(8, "uint64"), "F8_E4M3": DType(1, "float8_e4m3fn"),
          "F8_E5M2": DType(1, "float8_e5m2"), "C64": DType(8, "complex64")}


def torch_dtype(code: str, error: type[Exception] = SafetensorsError):
    """The torch dtype of a safetensors dtype name (error if this torch has none)."""
    import torch

    found = getattr(torch, DTYPES[code].torch_name, None) if code in DTYPES else None
    if found is None:
        raise error(f"safetensors dtype {code!r} has no torch dtype in torch {torch.__version__}")
    return found


def dtype_code(dtype) -> str | None:
    """The safetensors name of a torch dtype, None if safetensors cannot store it."""
    name = str(dtype).removeprefix("torch.")
    return next((code for code, d in DTYPES.items() if d.torch_name == name), None)


@dataclass(frozen=True)
class TensorEntry:
    dtype: str                  # safetensors dtype name: U8, F16, F32, …
    shape: tuple[int, ...]
    offset: int                 # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    size: int                           # bytes of the file
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]     # in the header's order


# -- one file -----------------------------------------------------------------------------------
def read_header(path: str | os.PathLike, error: type[Exception] = SafetensorsError
                ) -> SafetensorsHeader:
    """The checked header of `path` (see the module doc), touching no tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
                raise error(f"{path} is not a safetensors file (bad header length "
                            f"{n if n >= 0 else 'missing'} in a file of {size:,} bytes); it is "
                            f"truncated or corrupt: {REPAIR}")
            text = fh.read(n)
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{path}: the safetensors header is damaged (not JSON: {e}); {REPAIR}"
                    ) from None
    if not isinstance(header, dict):
        raise error(f"{path}: the safetensors header is damaged (not a JSON object); {REPAIR}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{path}: the safetensors header's __metadata__ is damaged (not an object "
                    f"of strings); {REPAIR}")
    spans = {key: _span(path, key, entry, error) for key, entry in header.items()}
    _check_spans(path, spans, size - 8 - n, error)
    return SafetensorsHeader(path, size, metadata, {
        key: TensorEntry(dtype, shape, 8 + n + start, stop - start)
        for key, (dtype, shape, start, stop) in spans.items()})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} appears twice")
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _span(path: Path, key: str, entry: Any, error) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, start, stop) of one header entry, its byte length checked."""
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError):
        raise error(f"{path}: the header entry of tensor {key} is damaged (it needs dtype, shape "
                    f"and data_offsets); {REPAIR}") from None
    if not isinstance(shape, list) or not all(_is_int(s) for s in shape) or \
            not isinstance(offsets, list) or len(offsets) != 2 or \
            not all(_is_int(o) for o in offsets) or offsets[0] > offsets[1]:
        raise error(f"{path}: the header entry of tensor {key} is damaged (shape {shape!r}, "
                    f"data_offsets {offsets!r}); {REPAIR}")
    if dtype not in DTYPES:
        raise error(f"{path}: tensor {key} has dtype {dtype!r}, which binllm does not read "
                    f"(it reads {', '.join(DTYPES)})")
    numel = 1
    for s in shape:
        numel *= s
    start, stop = offsets
    if numel * DTYPES[dtype].itemsize != stop - start:
        raise error(f"{path}: tensor {key} is {dtype} {tuple(shape)}, "
                    f"{numel * DTYPES[dtype].itemsize:,} bytes, but its data_offsets "
                    f"[{start}, {stop}) hold {stop - start:,}; the header is damaged: {REPAIR}")
    return dtype, tuple(shape), start, stop


def _check_spans(path: Path, spans: dict, data_bytes: int, error) -> None:
    """Sorted by offset, the tensors' bytes follow each other from 0 to the end of the file."""
    end, last = 0, None
    for key, (_, _, start, stop) in sorted(spans.items(), key=lambda kv: kv[1][2:]):
        if start < end:
            raise error(f"{path}: tensor {key} has an invalid offset: its bytes [{start}, {stop}) "
                        f"overlap those of {last} (up to {end}); the file is damaged: {REPAIR}")
        if start > end:
            raise error(f"{path}: tensor {key} has an invalid offset: bytes [{end}, {start}) "
                        f"before it belong to no tensor; the file is damaged: {REPAIR}")
        end, last = stop, key
    if end > data_bytes:
        raise error(f"{path} is truncated: its data area holds {data_bytes:,} bytes, its header "
                    f"needs {end:,} (up to the end of {last}); {REPAIR}")
    if end < data_bytes:
        raise error(f"{path}: the last {data_bytes - end:,} bytes belong to no tensor (its "
                    f"header needs {end:,} bytes of data); the file is damaged: {REPAIR}")


def read_tensors(path: str | os.PathLike, entries: Mapping[str, TensorEntry],
                 error: type[Exception] = SafetensorsError) -> dict[str, Any]:
    """{key: tensor} of `entries` (checked by `read_header`), read from `path` into fresh CPU
    tensors with plain reads of only their bytes.

    Not safe_open's get_tensor: its tensors are views of a private mapping of the whole file,
    which stays mapped (and its touched pages resident) while any tensor of that file lives.
    """
    import torch

    out = {}
    try:
        with open(path, "rb") as fh:
            for key, e in entries.items():
                t = torch.empty(e.shape, dtype=torch_dtype(e.dtype, error))
                if e.nbytes:
                    fh.seek(e.offset)
                    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                    if fh.readinto(view) != e.nbytes:
                        raise error(f"{path}: tensor {key} ends past the end of the file, "
                                    f"which was truncated after it was opened; {REPAIR}")
                out[key] = t
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror or e}); {REPAIR}") from None
    return out


# -- names and checkpoints -----------------------------------------------------------------------
def check_name(name: Any, source: str | os.PathLike, error: type[Exception] = SafetensorsError,
               *, plain: bool = False) -> str:
    """`name`, a file named in `source` (an index, a config), if it stays inside the directory:
    relative, no `..` part, no drive or root (plain: no directory part at all). Checked as a
    name, not resolved: symlinked files (a Hugging Face cache snapshot) stay valid."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{source} names a file {name!r}, which is not a file name; restore it or "
                    "re-download the model")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.anchor or ".." in posix.parts or ".." in windows.parts:
        raise error(f"{source} names {name}, which points outside the model directory; the "
                    "files of a model are named relative to it, without '..': restore it or "
                    "re-download the model")
    if plain and (len(posix.parts) != 1 or len(windows.parts) != 1 or name in (".",)):
        raise error(f"{source} names {name}, which is not a file directly in the model "
                    "directory (binllm writes no subdirectory); restore it or re-save the model")
    return name


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's files, every header checked: which file holds which tensor."""

    path: Path
    headers: dict[str, SafetensorsHeader]               # by file name
    entries: dict[str, tuple[str, TensorEntry]]         # key: (file name, entry)

    @property
    def total_bytes(self) -> int:
        return sum(h.size for h in self.headers.values())


def shard_names(directory: str | os.PathLike, error: type[Exception] = SafetensorsError
                ) -> tuple[dict[str, str] | None, list[str]] | None:
    """(the index's weight map or None, the file names), names checked; None when the
    directory has neither `model.safetensors.index.json` nor `model.safetensors`."""
    directory = Path(directory)
    index, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(k, str)
                                                           for k in weight_map):
                raise TypeError("weight_map is not an object of tensor names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise error(f"{index} is unreadable ({type(e).__name__}: {e}); re-download or "
                        "re-save the checkpoint") from None
        files = sorted({check_name(f, index, error) for f in weight_map.values()})
        return weight_map, files
    if single.is_file():
        return None, [SINGLE_FILE]
    return None


def open_checkpoint(directory: str | os.PathLike, error: type[Exception] = SafetensorsError
                    ) -> Checkpoint | None:
    """Every file of the checkpoint in `directory`, headers checked and cross-checked with the
    index (a key in two files, or in another file than the index says, is refused); None
    when there is no safetensors checkpoint there (see `shard_names`)."""
    directory = Path(directory)
    found = shard_names(directory, error)
    if found is None:
        return None
    weight_map, files = found
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        more = f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise error(f"{directory / INDEX_FILE} names {missing[0]}, which is not in {directory}"
                    f"{more}; copy the whole checkpoint")
    headers = {f: read_header(directory / f, error) for f in files}
    entries: dict[str, tuple[str, TensorEntry]] = {}
    for name, header in headers.items():
        for key, entry in header.tensors.items():
            if key in entries:
                raise error(f"tensor {key} is stored twice ({entries[key][0]} and {name}) in "
                            f"{directory}; the checkpoint is inconsistent (re-download it)")
            entries[key] = (name, entry)
    for key, name in (weight_map or {}).items():
        if entries.get(key, (None,))[0] != name:
            raise error(f"{directory / INDEX_FILE} puts {key} in {name}, whose header does not "
                        "hold it; the checkpoint is inconsistent (re-download it)")
    return Checkpoint(directory, headers, entries)
