"""Where a binarized model may be written: the checks made before any work starts.

`check_output_dir(out, overwrite=…, sources=…, needed_bytes=…)` refuses, with one line saying
what to change:
- an existing non-empty `out` without `overwrite`; with `overwrite`, anything that is not
  recognisably a binllm output (config.json with quantization_config.quant_method "binllm")
  or empty: `--overwrite` never deletes unrelated files;
- an `out` that is, or contains, one of `sources` (the input model's directory);
- a name too long for the filesystem once the temporary suffix of the atomic save is added,
  or a path too long;
- a parent that cannot be written (read-only filesystem, permissions);
- less free space than `needed_bytes` (a lower bound of the packed size, see
  `min_packed_bytes`).
The saved directory is written by `binllm.atomic.atomic_dir`; `binllm.atomic.OutputLock`
keeps two runs from writing the same `out`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..atomic import TEMP_SUFFIX_MAX, temp_prefix
from .saved_dir import QUANT_METHOD
from ..errors import BinllmError

LONGEST_INNER_NAME = len("model-00001-of-00001.safetensors.index.json") + 1


class OutputError(BinllmError, ValueError):
    """An output directory binllm refuses to write (the message says what to change)."""


class OutputExists(OutputError, FileExistsError):
    """The output exists and may not be replaced."""


def is_binllm_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by binllm (its config.json says quant_method)."""
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def existing_ancestor(path: Path) -> Path:
    """The nearest directory above `path` (itself excluded) that exists."""
    p = path.absolute().parent
    while not _exists(p) and p != p.parent:
        p = p.parent
    return p


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
    except (OSError, ValueError):  # missing, or a name the system cannot even look up
        return False
    return True


def name_max(path: str | os.PathLike) -> int:
    """NAME_MAX of the filesystem that would hold `path` (its nearest existing ancestor)."""
    return _pathconf(existing_ancestor(Path(path)), "PC_NAME_MAX", 255)


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(path, name))
    except (OSError, ValueError):
        return default


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def check_output_dir(out: str | os.PathLike, *, overwrite: bool = False,
                     sources: Iterable[str | os.PathLike | None] = (),
                     needed_bytes: int | None = None) -> None:
    """Raise OutputError unless a binllm model can be saved to `out` (see the module doc)."""
    out = Path(out)
    where = existing_ancestor(out)
    limit = name_max(out)
    name_len = len(os.fsencode(out.name))
    if name_len + TEMP_SUFFIX_MAX > limit:
        raise OutputError(f"out= name {out.name[:40]}… is {name_len} bytes; the atomic save adds "
                          f"up to {TEMP_SUFFIX_MAX} for its temporary name and the filesystem "
                          f"allows {limit}: use a name of at most {limit - TEMP_SUFFIX_MAX}")
    path_max = _pathconf(where, "PC_PATH_MAX", 4096)
    full = len(os.fsencode(str(out.absolute()))) + TEMP_SUFFIX_MAX + LONGEST_INNER_NAME
    if full > path_max:
        raise OutputError(f"out={str(out)[:40]}… is too long: its files' paths would need "
                          f"{full} bytes, the filesystem allows {path_max}; choose a shorter path")
    resolved = out.resolve()
    for src in sources:
        if not src or not Path(src).exists():
            continue
        s = Path(src).resolve()
        if s == resolved or resolved in s.parents:
            what = "is" if s == resolved else "contains"
            raise OutputError(f"out={out} {what} the input model {src}; saving there would "
                              "replace it: choose another out=")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputExists(f"out={out} exists and is not a directory; binllm replaces only "
                               "its own output directories: choose another out=")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputExists(f"out={out} exists and is not empty; pass overwrite=True to "
                                   "replace a binllm output, or choose another out=")
            if not is_binllm_dir(out):
                raise OutputExists(
                    f"out={out} is not a binllm output directory (no config.json with "
                    f"quantization_config.quant_method \"{QUANT_METHOD}\"); overwrite=True "
                    "replaces only those or empty folders: choose another out=")
    try:  # a real write, the only test that also holds for root and read-only filesystems
        probe = tempfile.mkdtemp(prefix=temp_prefix(out, "partial"), dir=where)
        os.rmdir(probe)
    except OSError as e:
        raise OutputError(f"cannot write in {where} ({e.strerror or e}); choose an out= on a "
                          "writable filesystem") from None
    if needed_bytes:
        free = shutil.disk_usage(where).free
        if free < needed_bytes:
            raise OutputError(f"out={out}: {where} has {_mib(free)} free, the packed model needs "
                              f"at least {_mib(needed_bytes)}; free space or choose another out=")


def min_packed_bytes(model, binarized: Iterable[str]) -> int:
    """A lower bound of the saved size: every kept tensor as stored, and each binarized linear
    at 1 bit per weight plus one fp16 scale per row (every packed format stores at least that).
    """
    binarized = set(binarized)
    total, seen = 0, set()
    for name, module in model.named_modules():
        if name in binarized:
            rows, cols = module.weight.shape
            total += rows * cols // 8 + 2 * rows
            if getattr(module, "bias", None) is not None:
                seen.add(id(module.bias))
                total += module.bias.numel() * module.bias.element_size()
            seen.add(id(module.weight))
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
