"""Checks of the command line before any work: arguments, paths, devices, memory.

`check_args(args)` runs in `app.main` right after parsing, for every command, and looks only
at the options the command has (by their argparse names), so a value that cannot work is
refused in one line naming the flag and what to use instead, before a model is loaded.
`check_model_size` and `check_calibration_memory` need a config or a loaded model and are
called by `common.load_model` and the commands that calibrate. `bf16_speed_note` is the note
`quantize`, `eval` and `generate` print when a bfloat16 model computes on a CPU without bf16
instructions.
"""

from __future__ import annotations

import errno
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
            check_no_link_loop(value, flag)
    if getattr(args, "report", None):
        check_output_file(args.report, "--report")
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


def check_no_link_loop(value: str, flag: str) -> None:
    """Refuse a path whose symbolic links lead back to themselves (it names nothing)."""
    try:
        os.stat(value)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CLIError(f"{flag} {value}: a loop of symbolic links (a link that leads back "
                           "to itself); fix or remove the link, or choose another path") from None
    except ValueError:  # a NUL byte: left to the command's own checks
        pass


def check_output_file(value: str, flag: str) -> None:
    """Refuse a result file that cannot be written, before any work: an existing folder, a
    path below a file, a place without write permission (probed by creating a file, which
    holds for root and read-only filesystems too). Used for --report and export's OUT."""
    path = Path(value)
    check_no_link_loop(value, flag)
    if path.is_dir():
        raise CLIError(f"{flag} {value} is a folder; name a file, e.g. "
                       f"{path / 'report.json'}")
    _check_writable_place(path, flag)


def check_output_folder(value: str, flag: str) -> None:
    """Refuse a results folder that cannot be made: an existing file, a path below a file, a
    place without write permission."""
    path = Path(value)
    check_no_link_loop(value, flag)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {value} is a file, not a folder; name a folder (it is created "
                       "if missing)")
    if path.is_dir():
        _probe_write(path, path, flag)
    else:
        _check_writable_place(path, flag)


def _check_writable_place(path: Path, flag: str) -> None:
    """The nearest existing folder above `path` is a folder where a file can be created."""
    above = path.absolute().parent
    while not _exists(above) and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise CLIError(f"{flag} {path}: {above} is a file, not a folder; choose a path inside "
                       "a folder")
    _probe_write(path, above, flag)


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


def _probe_write(path: Path, folder: Path, flag: str) -> None:
    from ..atomic import create_temp_file, temp_prefix

    try:
        create_temp_file(folder, temp_prefix(path, "tmp")).unlink()
    except OSError as e:
        raise CLIError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e}); choose "
                       "a writable place") from None


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
    config = read_config(local)
    if config is None:
        return
    try:
        stored = safetensors_bytes(local)
        check_config_fits(config, path, stored_bytes=stored,
                          bytes_per_parameter=1 / 8 if binllm_dir else _dtype_bytes(dtype, config))
    except PreflightError as e:
        raise CLIError(str(e)) from None


def read_config(model_dir: str | Path) -> dict[str, Any] | None:
    """The JSON object of MODEL/config.json (None when there is no such file); anything else
    there (not JSON, a list, a number) is refused in one line."""
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CLIError(f"{cfg_file} is not valid JSON; restore the model's config.json"
                       ) from None
    if not isinstance(config, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(config), "a number")
        raise CLIError(f"{cfg_file} holds {kind}, not a JSON object; restore the model's "
                       "config.json")
    return config


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


def bf16_speed_note(dtype, device: str, flags: str | None = None) -> str | None:
    """A note for a bfloat16 model computing on a CPU without bf16 instructions (AVX512-BF16,
    AMX-BF16): torch converts there, and a bf16 matmul runs several times slower than a float32
    one, so calibration and evaluation take that much longer. `flags` is the CPU's flag line
    (default: /proc/cpuinfo's); None where the note does not apply or the flags are unknown."""
    import torch

    from ..kernels.cpu_features import fast_bf16_matmul

    if dtype != torch.bfloat16 or not str(device).startswith("cpu") or fast_bf16_matmul(flags):
        return None
    return ("the model computes in bfloat16, and this CPU has no bfloat16 instructions "
            "(AVX512-BF16 or AMX): its matmuls run several times slower than in float32 here; "
            "--dtype float32 runs faster (its unquantized weights take twice the memory)")
