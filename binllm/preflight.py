"""Checks before any work: will it fit, and are the files complete?

Estimates only; nothing here allocates. Used by the CLI (and by `binllm.load`) so that a
request that cannot succeed is refused in one line instead of growing until the kernel kills
it:

- `available_memory(device)`: bytes the process may still allocate (MemAvailable, bounded by
  a cgroup limit; free device memory for CUDA), without psutil.
- `config_parameters(config)`: a lower bound on the parameter count a model config implies,
  computed from its shape fields (before any skeleton is built).
- `hidden_width(model)`: the width of the hidden states between decoder layers (the
  calibration estimate in `binllm.engine.memory` and the streamed evaluation's passes use it).
- `safetensors_bytes(dir)`: every safetensors file of a checkpoint is read as
  `binllm.safetensors_io` checks it (a truncated file, or an index naming a file outside
  the directory, is refused with its name); returns their total size.

Only the standard library at import time; imports no other binllm module but `errors` and
`safetensors_io`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BinllmError
from .safetensors_io import INDEX_FILE, open_checkpoint, read_header


class PreflightError(BinllmError, ValueError):
    """A request that cannot succeed (too large, inconsistent or incomplete input)."""


def gib(n: float) -> str:
    """Bytes in the unit a reader takes in at once: 512.0 KiB, 3.2 GiB, 41.0 TiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1024:,.1f} KiB"


# -- available memory --------------------------------------------------------------------------
def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, then v1); None if unlimited."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            return max(0, limit - usage)
    return None


def available_memory(device: Any = "cpu") -> int | None:
    """Bytes still available on `device` (None when it cannot be told)."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError):
            return None
    if kind != "cpu":
        return None
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(found) if found else None


# -- what a config implies -------------------------------------------------------------------
def _field(cfg: Any, *names: str) -> int | None:
    for name in names:
        v = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


@dataclass(frozen=True)
class ConfigShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int

    @property
    def parameters(self) -> int:
        """Lower bound: per layer the query and output projections (h × h each) and two MLP
        matrices (h × intermediate), plus one vocab × h embedding."""
        h = self.hidden
        return self.layers * (2 * h * h + 2 * h * self.intermediate) + self.vocab * h

    def describe(self) -> str:
        return (f"hidden_size={self.hidden}, num_hidden_layers={self.layers}, "
                f"intermediate_size={self.intermediate}, vocab_size={self.vocab}")


def config_shape(config: Any) -> ConfigShape | None:
    """The shape fields of a transformers config (object or config.json dict); None if the
    config does not say (then nothing is checked)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    elif isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    hidden = _field(config, "hidden_size", "n_embd", "d_model")
    layers = _field(config, "num_hidden_layers", "n_layer", "num_layers")
    if hidden is None or layers is None:
        return None
    return ConfigShape(hidden, layers, _field(config, "intermediate_size", "ffn_dim", "n_inner")
                       or 0, _field(config, "vocab_size") or 0)


def check_config_fits(config: Any, path: str, *, bytes_per_parameter: float | None,
                      stored_bytes: int | None, device: Any = "cpu") -> None:
    """Refuse a config whose shape cannot be loaded: larger than the available memory at
    `bytes_per_parameter` (None: not loaded whole, no memory estimate), or far larger than the
    weight files next to it (`stored_bytes`: fewer than half a bit per declared weight means
    the config does not belong to them)."""
    shape = config_shape(config)
    if shape is None:
        return
    n = shape.parameters
    if stored_bytes is not None and stored_bytes * 8 * 2 < n:
        raise PreflightError(
            f"{path}: config.json declares at least {n:,} parameters ({shape.describe()}) but "
            f"its weight files hold only {gib(stored_bytes)}; the config does not belong to "
            "these weights (restore the model's own config.json)")
    if bytes_per_parameter is None:
        return
    need = n * bytes_per_parameter
    avail = available_memory(device)
    if avail is not None and need > avail:
        raise PreflightError(
            f"{path}: loading needs at least {gib(need)} ({n:,} parameters: {shape.describe()}), "
            f"only {gib(avail)} of memory is available; use a machine with more memory or a "
            "smaller model")


# -- calibration ---------------------------------------------------------------------------------
def hidden_width(model: Any) -> int:
    """Width of the hidden states between decoder layers: the config's hidden size, else the
    input embeddings' (OPT's word_embed_proj_dim may differ from the former)."""
    shape = config_shape(getattr(model, "config", None) or {})
    return shape.hidden if shape else _embedding_width(model)


def _embedding_width(model: Any) -> int:
    try:
        return int(model.get_input_embeddings().embedding_dim)
    except (AttributeError, NotImplementedError):
        return 0


# -- safetensors files ---------------------------------------------------------------------------
def safetensors_bytes(folder: str | os.PathLike) -> int | None:
    """Total size of the checkpoint's safetensors files (those its index names, else every
    `*.safetensors` in the folder), each header checked by `binllm.safetensors_io` (names
    inside the folder, dtypes, shapes, offsets against the file size; a truncated file is
    refused with its name). None: no such files."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        return open_checkpoint(folder, PreflightError).total_bytes
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    return sum(read_header(f, PreflightError).size for f in files)
