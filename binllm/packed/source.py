"""Where a loaded BinaryLinear's packed codes live once they are released from memory.

A model loaded for inference computes from its kernel form (`binllm.kernels.form`), which is
derived from the packed tensors once at load. Holding both would cost the codes twice
(kernels.md: 49 MiB instead of 25 for one 7B-shaped rtn-sign layer, 282 instead of 215 for
arb-llm-rc), so the loaders (`binllm.load`, `from_pretrained`) release the packed tensors and
keep a `PackedSource` instead: the open shard it came from, the byte range of each tensor in
it and the sha256 of those bytes, taken when they were first read (the bytes the form was
derived from). Whatever needs the codes afterwards (`state_dict` / `save_pretrained`,
`.codes()`, `.dequantize()`, the reference and cache-dequantized forwards, a device move of a
layer whose GPU kernel reads the packed bits) re-reads them on demand, checks the digest and
gets exactly the stored bytes back.

Why this design rather than the alternatives:
- a memory map of the file (the tensors not resident until touched) would fault the pages in
  as soon as the form is derived or the state_dict is written, counts them in the RSS, and
  turns a file truncated behind the process's back into a SIGBUS;
- deriving the codes back from the form is not exact (its coefficients are fp32 sums of the
  stored fp16 scales);
- re-reading by path alone would break as soon as the directory is deleted or replaced (a
  re-save with `overwrite`): the shard's file descriptor stays open instead (`ShardHandle`),
  so the bytes stay readable until the model is freed, and only a file changed in place or
  truncated is refused, by the digest, with a `PackedSourceError` naming the layer and file.
The price: one sha256 pass over the codes at load and at each re-read, and an open file
descriptor per shard while the model lives.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..safetensors_io import torch_dtype
from .saved_dir import CheckpointError


class PackedSourceError(CheckpointError):
    """A released layer's packed codes cannot be read back exactly from their file."""


class ShardHandle:
    """A read-only file descriptor of one shard, shared by every layer read from it.

    Copies (deepcopy) share it; pickling stores the path and reopens it when unpickled (the
    digests still guard the bytes). Closed when the last layer holding it is freed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise PackedSourceError(f"{self.path} cannot be opened ({e.strerror})") from None
        weakref.finalize(self, os.close, self.fd)

    def read(self, offset: int, nbytes: int) -> bytearray:
        """nbytes bytes at offset (PackedSourceError when the file is shorter now)."""
        buf = bytearray(nbytes)
        view, done = memoryview(buf), 0
        while done < nbytes:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise PackedSourceError(f"{self.path} ends at byte {offset + done}, before the "
                                        f"{nbytes} bytes stored at {offset}: it was truncated")
            done += n
        return buf

    def __deepcopy__(self, memo) -> ShardHandle:
        return self

    def __reduce__(self):
        return (ShardHandle, (str(self.path),))


@dataclass(frozen=True)
class StoredRange:
    suffix: str               # the BinaryLinear buffer name
    shard: ShardHandle
    offset: int               # absolute byte offset of the tensor's data in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PackedSource:
    """One layer's packed tensors in their shard(s), and the sha256 of their bytes."""

    name: str                 # the linear's name in the model
    ranges: tuple[StoredRange, ...]
    digest: str

    @classmethod
    def first_read(cls, name: str, ranges: tuple[StoredRange, ...]
                   ) -> tuple[PackedSource, dict[str, Tensor]]:
        """Read the tensors once and fix their digest: (source, tensors on the CPU)."""
        h = hashlib.sha256()
        tensors = {r.suffix: _tensor(r, _read(name, r), h) for r in ranges}
        return cls(name, ranges, h.hexdigest()), tensors

    def read(self) -> dict[str, Tensor]:
        """The packed tensors (CPU), exactly the bytes read at load, or PackedSourceError."""
        h = hashlib.sha256()
        tensors = {r.suffix: _tensor(r, _read(self.name, r), h) for r in self.ranges}
        if h.hexdigest() != self.digest:
            files = sorted({str(r.shard.path) for r in self.ranges})
            raise PackedSourceError(
                f"{self.name}: its packed codes were released from memory after loading and "
                f"{', '.join(files)} no longer holds the bytes loaded (sha256 differs): the "
                "file was changed in place; reload the model from an intact copy, or load "
                "with keep_packed=True to keep the codes in memory")
        return tensors

    def matches(self, tensors: dict[str, Tensor]) -> bool:
        """Whether `tensors` (a layer's buffers, any device) hold exactly these bytes."""
        if set(tensors) != {r.suffix for r in self.ranges}:
            return False
        h = hashlib.sha256()
        for r in self.ranges:
            t = tensors[r.suffix]
            if t.dtype != r.dtype or tuple(t.shape) != r.shape or t.is_meta:
                return False
            h.update(_bytes_of(t))
        return h.hexdigest() == self.digest

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ranges)


def _read(name: str, r: StoredRange) -> bytearray:
    try:
        return r.shard.read(r.offset, r.nbytes)
    except PackedSourceError as e:
        raise PackedSourceError(f"{name}: its packed codes were released from memory after "
                                f"loading and cannot be read back: {e}; reload the model, or "
                                "load with keep_packed=True to keep the codes in memory") from None


def _tensor(r: StoredRange, buf: bytearray, h) -> Tensor:
    h.update(buf)
    return torch.frombuffer(buf, dtype=r.dtype).reshape(r.shape)


def _bytes_of(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class SavedSources:
    """Builds the PackedSource of each layer of one saved directory (`SavedModel`, whose
    headers `read_saved` checked and whose offsets it holds), opening each shard once."""

    def __init__(self, saved):
        self.saved = saved
        self._shards: dict[str, ShardHandle] = {}

    def ranges(self, name: str, layout) -> tuple[StoredRange, ...]:
        out = []
        for suffix in layout.specs():
            key = f"{name}.{suffix}"
            st = self.saved.tensors[key]
            if st.file not in self._shards:
                self._shards[st.file] = ShardHandle(self.saved.path / st.file)
            out.append(StoredRange(suffix, self._shards[st.file], st.offset, st.nbytes,
                                   torch_dtype(st.dtype, PackedSourceError), tuple(st.shape)))
        return tuple(out)

    def first_read(self, name: str, layout) -> tuple[PackedSource, dict[str, Tensor]]:
        return PackedSource.first_read(name, self.ranges(name, layout))
