"""What identifies the inputs of a comparison: the model's files and the data files it reads.

`binllm compare` keeps the protocol's settings beside its results and refuses to add rows
computed on other settings; the settings alone do not tell a relative model path that now
names another model, or another data directory, apart. `inputs_fingerprint` records:

- the model: its resolved path and a sha256 over config.json and every weight file's name,
  size and header (a safetensors file's JSON header names every tensor with its dtype, shape
  and offsets: another checkpoint has another header); a hub id as it is;
- each dataset split read: the resolved file and the sha256 of its bytes (the hub: its name).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .data import locate

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
HEADER_CAP = 1 << 24  # bytes of a safetensors header hashed at most


def model_fingerprint(model: str) -> dict[str, Any]:
    """{"path", "sha256"} of a local model directory; {"hub": id} otherwise."""
    path = Path(model)
    if not path.is_dir():
        return {"hub": model}
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "config.json" or f.name.endswith(".index.json"):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        elif f.suffix in WEIGHT_SUFFIXES and f.is_file():
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode() + _header(f))
    return {"path": str(path.resolve()), "sha256": h.hexdigest()}


def _header(f: Path) -> bytes:
    """A safetensors file's length prefix and JSON header (empty for other formats)."""
    if f.suffix != ".safetensors":
        return b""
    with open(f, "rb") as fh:
        prefix = fh.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        return prefix + fh.read(min(n, HEADER_CAP))


def data_fingerprint(name: str, split: str, root: str | os.PathLike | None) -> dict[str, Any]:
    """{"path", "sha256"} of the file `load_text(name, split, root)` reads; the hub: its name."""
    where = locate(name, split, root)
    if where.path is None:
        return {"hub": f"{name}:{split}"}
    return {"path": str(where.path.resolve()),
            "sha256": hashlib.sha256(where.path.read_bytes()).hexdigest()}


def inputs_fingerprint(model: str, datasets: list[tuple[str, str]],
                       root: str | os.PathLike | None) -> dict[str, Any]:
    """The model's fingerprint and one per (dataset, split) read, keyed "name:split"."""
    return {"model": model_fingerprint(model),
            "data": {f"{n}:{s}": data_fingerprint(n, s, root) for n, s in datasets}}
