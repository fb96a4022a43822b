"""Atomic writes: a file or a directory appears complete under its name, or not at all.

Everything binllm writes (reports, journal layers, QAT checkpoints, saved model directories)
goes through here: the content is written under a hidden temporary name beside the target,
flushed to disk (fsync), then renamed over the target in one step. A crash at any point leaves
the old target (or none) and, at worst, a hidden temporary `.NAME.partial-PID-…` /
`.NAME.tmp-PID-…` / `.NAME.old-PID` that names the writing process: the next write of the same
target removes those whose process is no longer alive (`remove_stale_temporaries`).
`OutputLock` keeps two processes from writing the same target at once. Imports nothing of binllm.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import BinllmError


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file (or a directory entry table) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# hidden temporaries beside a target NAME: .NAME.partial-PID-xxxx, .NAME.tmp-PID-xxxx, .NAME.old-PID
TEMP_KINDS = ("partial", "tmp", "old")
TEMP_SUFFIX_MAX = len(".partial-4194304-xxxxxxxx") + 1  # longest suffix added to a target's name


def temp_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 probes, sends nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporaries of `target` left by processes that are no longer alive.

    Temporaries of live processes (a concurrent save) and of this process are left alone.
    Returns what was removed.
    """
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.({'|'.join(TEMP_KINDS)})-(\d+)(-.*)?$")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or int(m.group(2)) == os.getpid() or pid_alive(int(m.group(2))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


class OutputLocked(BinllmError, OSError):
    """Another live process holds the lock of this output."""


class OutputLock:
    """An exclusive lock on `target`, held in the hidden file `.NAME.lock` beside it.

    flock(2) locks vanish with their process, so a killed run never leaves a stale lock; the
    lock file holds the owner's pid (for the message) and is removed on release.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                owner = ""
                with contextlib.suppress(OSError, ValueError):
                    owner = f" (pid {int(self.path.read_text().strip())})"
                raise OutputLocked(f"another binllm process{owner} is writing {self.target} "
                                   f"(lock {self.path}); wait for it to finish or choose "
                                   "another output") from None
            try:  # the previous owner may have removed the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def create_temp_file(folder: Path, prefix: str) -> Path:
    """A new empty file `folder/prefix<random>` with the usual permissions (0666 less the umask,
    0644 as a rule; tempfile.mkstemp's are 0600), so that renamed results read as any file."""
    for _ in range(100):
        candidate = folder / f"{prefix}{secrets.token_hex(4)}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder / prefix))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call write(tmp) for a temporary path beside `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = create_temp_file(path.parent, temp_prefix(path, "tmp"))
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
    temporary directory is removed and `out` is untouched. Temporaries of earlier saves of `out`
    whose process died (killed mid-save) are removed first.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    prefix = partial_prefix or temp_prefix(out, "partial")
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
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        os.replace(out, old)
    os.replace(tmp, out)
    with contextlib.suppress(OSError):
        fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
