"""Atomic writes: a file or a directory appears complete under its name, or not at all.

Everything binllm writes (reports, journal layers, QAT checkpoints, saved model directories)
goes through here: the content is written under a hidden temporary name beside the target,
flushed to disk (fsync), then renamed over the target in one step. A crash at any point leaves
the old target (or none) and, at worst, a hidden temporary that the next write may clean.
Imports nothing of binllm.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file (or a directory entry table) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call write(tmp) for a temporary path beside `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indented, unknown objects as str) written atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str)))


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, partial_prefix: str | None = None) -> Iterator[Path]:
    """Yield a fresh hidden directory beside `out`; on success it replaces `out` in one rename.

    A previous `out` is moved aside first and removed after the rename. On an exception the
    temporary directory is removed and `out` is untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = partial_prefix or f".{out.name}.partial-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                fsync_path(f)
        tmp.chmod(0o755)  # mkdtemp made it private
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path) -> None:
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    with contextlib.suppress(OSError):
        fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
