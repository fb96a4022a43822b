"""Checks of the command line before any work: arguments, paths, devices, memory.

`check_args(args)` runs in `app.main` right after parsing, for every command, and looks only
at the options the command has (by their argparse names), so a value that cannot work is
refused in one line naming the flag and what to use instead, before a model is loaded.
`check_model_size` and `check_calibration_memory` need a config or a loaded model and are
called by `common.load_model` and the commands that calibrate.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import CLIError

# argparse dest → how the user wrote it (positional MODEL included)
PATH_OPTIONS = {"model": "MODEL", "calib": "--calib", "train": "--train", "out": "--out",
                "report": "--report", "resume_dir": "--resume-dir", "data_dir": "--data-dir",
                "checkpoint": "--checkpoint", "tasks_path": "--tasks-path"}
PATH_MAX = 4096


def check_args(args) -> None:
    for dest, flag in PATH_OPTIONS.items():
        value = getattr(args, dest, None)
        if isinstance(value, str) and value:
            check_path_length(value, flag)
    _check_numbers(args)
    resume = getattr(args, "resume_dir", None)
    if resume and Path(resume).exists() and not Path(resume).is_dir():
        raise CLIError(f"--resume-dir {resume} is a file, not a folder; pass a folder "
                       "(it is created if missing)")
    if getattr(args, "device", None) is not None:
        check_device(args.device)


def _check_numbers(args) -> None:
    def has(name):
        return getattr(args, name, None) is not None

    if has("block_size") and args.block_size < 1:
        raise CLIError(f"--block-size {args.block_size}: use a positive number of columns "
                       "(128 in the papers)")
    if has("percdamp") and not (math.isfinite(args.percdamp) and 0 < args.percdamp < 10):
        raise CLIError(f"--percdamp {args.percdamp}: use a small positive fraction of the mean "
                       "Hessian diagonal, e.g. 0.01")
    if has("nsamples") and args.nsamples < 1:
        raise CLIError(f"--nsamples must be at least 1 (got {args.nsamples}); it counts "
                       "calibration windows")
    if has("max_windows") and args.max_windows < 1:
        raise CLIError(f"--max-windows {args.max_windows}: use a positive number of windows, "
                       "or 'all' (the default of quantize and eval) for the whole test split")
    if has("temperature") and not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CLIError(f"--temperature {args.temperature}: use 0 (greedy) or a positive value "
                       "such as 0.8")
    if has("top_p") and not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p {args.top_p}: use a probability in (0, 1], e.g. 0.9 "
                       "(1 keeps every token)")


def check_path_length(value: str, flag: str) -> None:
    """Refuse a path the filesystem cannot name (a component over NAME_MAX, or over PATH_MAX)."""
    size = len(os.fsencode(value))
    if size >= PATH_MAX:
        raise CLIError(f"{flag}: the path is {size} bytes long, over the {PATH_MAX} the "
                       "system allows; use a shorter path")
    from ..packed.output import name_max

    limit = name_max(Path(value).absolute())
    for part in Path(value).parts:
        if len(os.fsencode(part)) > limit:
            short = part[:24] + "…"
            raise CLIError(f"{flag}: the name {short!r} is {len(os.fsencode(part))} bytes, over "
                           f"the {limit} this filesystem allows for one name; use a shorter name")


def check_device(device: str) -> None:
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device}: not a device torch knows; use cpu, cuda, cuda:N "
                       "or mps") from None
    if d.type == "cpu":
        return
    if d.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise CLIError(f"--device {device}: this torch build ({torch.__version__}) has no "
                           "CUDA support; install a CUDA build of torch or use --device cpu")
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: no CUDA device is visible (no GPU, no driver, "
                           "or CUDA_VISIBLE_DEVICES hides them); use --device cpu")
        count = torch.cuda.device_count()
        if d.index is not None and d.index >= count:
            raise CLIError(f"--device {device}: this machine has {count} CUDA device(s), "
                           f"cuda:0 to cuda:{count - 1}")
        return
    if d.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"--device {device}: MPS is not available here; use --device cpu")
        return
    raise CLIError(f"--device {device}: binllm runs on cpu, cuda or mps")


# -- memory -----------------------------------------------------------------------------------
def _dtype_bytes(dtype: str, config: dict[str, Any]) -> int:
    name = dtype if dtype != "auto" else str(config.get("dtype") or config.get("torch_dtype")
                                            or "float32")
    name = name.removeprefix("torch.")
    return {"float16": 2, "bfloat16": 2, "half": 2, "float64": 8}.get(name, 4)


def check_model_size(path: str, dtype: str = "auto", binllm_dir: bool = False) -> None:
    """Before any skeleton is built: the config's shape fits memory and matches the files.

    A local directory only (a hub id is checked by transformers after its download). Packed
    binllm directories count one bit per declared weight, dense ones their load dtype.
    """
    from ..preflight import PreflightError, check_config_fits, safetensors_bytes

    local = Path(path)
    cfg_file = local / "config.json"
    if not cfg_file.is_file():
        return
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CLIError(f"{cfg_file} is not valid JSON; restore the model's config.json"
                       ) from None
    if not isinstance(config, dict):
        raise CLIError(f"{cfg_file} does not hold a JSON object; restore the model's config.json")
    try:
        stored = safetensors_bytes(local)
        check_config_fits(config, path, stored_bytes=stored,
                          bytes_per_parameter=1 / 8 if binllm_dir else _dtype_bytes(dtype, config))
    except PreflightError as e:
        raise CLIError(str(e)) from None


def check_calibration_memory(model, nsamples: int, seqlen: int, device: str,
                             needs_hessian: bool) -> None:
    """Refuse a calibration set whose activations and Hessians cannot fit where they live."""
    from ..engine.memory import calibration_memory
    from ..preflight import available_memory, gib

    need = calibration_memory(model, nsamples, seqlen, needs_hessian=needs_hessian)
    avail = available_memory(device)
    if avail is not None and need.total > avail:
        raise CLIError(f"--nsamples {nsamples} --seqlen {seqlen}: calibration needs about "
                       f"{gib(need.total)} ({need.detail}), {gib(avail)} is available on "
                       f"{device}; use a smaller --nsamples or --seqlen")
