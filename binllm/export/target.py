"""Where an export may be written, checked before any work: `check_target`, and `ExportError`.

`check_target(out, model_dir, overwrite=…)` refuses, in one line saying what to change: an
`out` that is a folder or lies below a file; one inside the model directory being exported
(checked on the resolved path, so a symbolic link into it counts too), even with `overwrite`:
an export never writes over or beside the model's own files; an existing file without
`overwrite`; a place where no file can be created (probed by creating one, which holds for
root and read-only filesystems such as /proc too). The file itself is written by
`binllm.atomic.atomic_write`: it appears complete or not at all.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..atomic import temp_prefix
from ..errors import BinllmError


class ExportError(BinllmError, ValueError):
    """A model, codes or output the export cannot write exactly (the message says what to do)."""


def check_target(out: str | os.PathLike, model_dir: str | os.PathLike, *,
                 overwrite: bool = False) -> Path:
    """Raise ExportError unless `out` may be written; returns it as a Path."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"output {out} is a folder; name a file, e.g. {out / 'model.gguf'}")
    resolved, source = out.resolve(), Path(model_dir).resolve()
    if resolved == source or source in resolved.parents:
        raise ExportError(f"output {out} is inside the model directory {model_dir} being "
                          "exported; an export never writes there (not even with --overwrite): "
                          "choose a path outside it")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ExportError(f"output {out} exists; pass --overwrite to replace it, or choose "
                          "another path")
    above = out.absolute().parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ExportError(f"output {out}: {above} is a file, not a folder; choose a path inside "
                          "a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(out, "tmp"), dir=above)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ExportError(f"output {out}: cannot write in {above} ({e.strerror or e}); choose "
                          "a writable place") from None
    return out
