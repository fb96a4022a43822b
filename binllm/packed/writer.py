"""Writing a saved directory's safetensors shards incrementally, one tensor at a time.

`ShardWriter(tmp)` receives tensors in the order they should be stored (`add(key, tensor)`)
and writes each one's bytes to disk at once, so neither the whole model nor a whole shard is
ever held in memory: that is what lets `binllm quantize` save a model layer by layer as the
layers finish (`binllm.engine.stream`). A shard is closed when the next tensor would take it
past `max_shard_bytes` (the rule `save_binarized` has always used), and `close(metadata)`
writes the shards under their final names — `model.safetensors` when there is one, else
`model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json` — with `metadata`
(the layouts digest, known only once every layer is done) in every header, and returns the
`files` record of quantization_config (bytes and sha256 of each).

The files are plain safetensors (https://github.com/huggingface/safetensors, "Format"): an
8-byte little-endian header length, a JSON header {key: {dtype, shape, data_offsets}} with
`__metadata__`, padded with spaces to a multiple of 8 bytes, then the tensors' bytes back to
back. A shard's data goes to a hidden body file; `close` writes each header and appends its
body. The writer works inside a temporary directory the caller
publishes atomically (`binllm.atomic.atomic_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..safetensors_io import INDEX_FILE, SINGLE_FILE, dtype_code
from .layout import FORMAT_VERSION
from .saved_dir import sha256_file

DEFAULT_SHARD_BYTES = 2 * 2**30


@dataclass
class _Shard:
    body: Path
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    nbytes: int = 0


class ShardWriter:
    """Safetensors shards of at most `max_shard_bytes` of tensor data, written as tensors come."""

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be positive")
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", "binllm_format_version": str(FORMAT_VERSION)}
        self._done: list[_Shard] = []   # closed shards, their bodies written
        self._open: _Shard | None = None
        self._handle = None
        self.total_bytes = 0

    def add(self, key: str, tensor: Tensor) -> None:
        """Store `tensor` under `key` (copied to the CPU, written now)."""
        code = dtype_code(tensor.dtype)
        if code is None:
            raise ValueError(f"{key}: dtype {tensor.dtype} cannot be stored in safetensors")
        if tensor.device.type == "meta":
            raise ValueError(f"{key} is on the meta device; its weights were never loaded")
        nbytes = tensor.numel() * tensor.element_size()
        if self._open is not None and self._open.entries \
                and self._open.nbytes + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._open is None:
            body = self.directory / f".shard-{len(self._done) + 1:05d}.body"
            self._open = _Shard(body)
            self._handle = open(body, "wb")
        shard = self._open
        if any(key in done.entries for done in self._done) or key in shard.entries:
            raise ValueError(f"tensor {key} is stored twice")
        if nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._handle.write(memoryview(data.numpy()))  # the tensor's own bytes, no copy
        shard.entries[key] = {"dtype": code, "shape": list(tensor.shape),
                              "data_offsets": [shard.nbytes, shard.nbytes + nbytes]}
        shard.nbytes += nbytes
        self.total_bytes += nbytes

    def _close_shard(self) -> None:
        self._handle.close()
        self._handle = None
        self._done.append(self._open)
        self._open = None

    def close(self, metadata: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """Write the shards (`metadata` added to each header) under their final names and the
        index (several shards); return {file: {bytes, sha256}}."""
        if self._open is not None:
            self._close_shard()
        n = len(self._done)
        names = ([SINGLE_FILE] if n == 1
                 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        meta = {**self.metadata, **(metadata or {})}
        files, weight_map = {}, {}
        for name, shard in zip(names, self._done):
            final = self.directory / name
            header = json.dumps({"__metadata__": meta, **shard.entries},
                                separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)
            with open(final, "wb") as out, open(shard.body, "rb") as body:
                out.write(struct.pack("<Q", len(header)))
                out.write(header)
                shutil.copyfileobj(body, out, 1 << 24)
            shard.body.unlink()
            files[name] = {"bytes": final.stat().st_size, "sha256": sha256_file(final)}
            weight_map.update({k: name for k in shard.entries})
        if n > 1:
            with open(self.directory / INDEX_FILE, "w") as f:
                json.dump({"metadata": {"total_size": self.total_bytes},
                           "weight_map": weight_map}, f, indent=2)
        return files

    def abort(self) -> None:
        """Close the open body file (the caller removes the temporary directory)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
