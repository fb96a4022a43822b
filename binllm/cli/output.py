"""`binllm quantize --out/--overwrite/--skip/--resume-dir`: the checks made before any work and
the save that keeps the work when it fails.

Before the model is calibrated: `--out` is checked (`binllm.packed.output.check_output_dir`:
not the input model nor a folder containing it, `--overwrite` only over a binllm output,
name and path length, a writable parent, free space against a lower bound of the packed
size) and locked (`.NAME.lock`, so a second run writing the same `--out` stops at once);
`--skip` must name linears the model has; every tensor of the checkpoint must be finite; the
`--resume-dir` layer files must match their checksums. When the save still fails (disk full,
filesystem turned read-only …), every binarized layer is written as a resume journal (the
`--resume-dir` if there is one, else the first writable of: beside `--out`, the temporary
directory, the working directory) and the error says which, so rerunning with
`--resume-dir THERE` saves without calibrating again.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from .common import CLIError


def check_out(args, model=None) -> None:
    """Refuse a bad --out now (with the model: also the free space it needs)."""
    from ..packed.output import OutputError, check_output_dir, min_packed_bytes

    needed = None
    if model is not None:
        from ..engine.binarize import binarized_names

        needed = min_packed_bytes(model, binarized_names(model, _skip(args)))
    try:
        check_output_dir(args.out, overwrite=args.overwrite, sources=[args.model],
                         needed_bytes=needed)
    except OutputError as e:
        raise CLIError(str(e)) from None


def lock_out(args, stack: contextlib.ExitStack) -> None:
    """Hold the lock of --out until `stack` closes."""
    from ..atomic import OutputLock, OutputLocked

    try:
        stack.enter_context(OutputLock(args.out))
    except OutputLocked as e:
        raise CLIError(str(e)) from None


def check_model(args, model) -> None:
    """--skip names and finite weights, before any layer is touched (and before calibration data
    is read); the in-memory path then calls binarize_model(..., checked=True)."""
    from ..engine.binarize import UnknownSkip, check_finite, check_skip

    try:
        check_skip(model, _skip(args))
    except UnknownSkip as e:
        raise CLIError(str(e)) from None
    check_finite(model)  # NonFiniteWeights: a one-line error in the CLI


def _skip(args) -> tuple[str, ...]:
    from .common import csv_list

    return tuple(csv_list(args.skip))


def save_or_keep(args, model, qreport, tokenizer, journal, identity: dict[str, Any]) -> None:
    """save_binarized to --out; on failure keep the codes as a resume journal and say where."""
    from ..packed.checkpoint import save_binarized
    from ..packed.output import OutputError

    try:
        save_binarized(model.to("cpu"), qreport, tokenizer, args.out, overwrite=args.overwrite,
                       lock=False)
        return
    except (OSError, OutputError) as e:
        failure = f"{type(e).__name__}: {e}" if not str(e).startswith("out=") else str(e)
    where, why = _keep_codes(args, model, qreport, journal, identity)
    if where is None:
        raise CLIError(f"saving {args.out} failed ({failure}); keeping the binarized layers "
                       f"failed too ({why})") from None
    raise CLIError(f"saving {args.out} failed ({failure}); the binarized layers are kept in "
                   f"{where}: fix the cause, then rerun the same command with --resume-dir "
                   f"{where} to save without calibrating again") from None


def _keep_codes(args, model, qreport, journal, identity):
    from ..engine.journal import LayerJournal
    from ..engine.walker import find_decoder_layers

    path, layers = find_decoder_layers(model)
    if journal is not None:  # every layer is already there
        return journal.path, None
    out = Path(args.out)
    name = f"binllm-journal-{out.name[:80]}-{os.getpid()}"
    why = None
    for folder in (out.absolute().parent, Path(tempfile.gettempdir()), Path.cwd()):
        target = folder / name
        try:
            LayerJournal(target, identity).save_report(qreport, path, len(layers))
            return target, None
        except OSError as e:
            why = f"{target}: {e.strerror or e}"
    return None, why
