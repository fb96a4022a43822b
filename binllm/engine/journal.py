"""Resume a crashed binarization run: every finished decoder layer is kept on disk.

A `LayerJournal` is a folder. `journal.json` records what the run is (the config, a sha256
of the calibration token ids, the model class and its decoder-layer count); each finished
layer i is one file `layer_{i:05d}.safetensors` holding the packed codes of its linears
(`binllm.packed.layout`) and, in the header metadata, their layouts, reports and a sha256 of
all of it (tensor names, dtypes, shapes, bytes and the other metadata), checked on every read:
a damaged layer file is refused with its name, never used. Every file is written to a
temporary name and renamed, so a crash leaves either the whole layer or none.

Resuming replays the run: layers found in the journal get their weights from the stored
codes (which dequantize to exactly the calibrated weights) instead of being quantized
again, and the walker still runs them on the calibration batches, so the later layers see
the same inputs as in an uninterrupted run. No activations are stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_write
from ..packed.layout import PackedLayout, pack, unpack
from ..errors import BinllmError

MANIFEST = "journal.json"
JOURNAL_VERSION = 3  # layer files carry a sha256 and the calibrated (fp32-scale) codes


class JournalMismatch(BinllmError, ValueError):
    """The journal folder belongs to a different run (model, method, arguments or data)."""


def calibration_sha256(batches: list[Tensor]) -> str:
    h = hashlib.sha256()
    for ids in batches:
        h.update(str(tuple(ids.shape)).encode())
        h.update(ids.to(torch.int64).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def contents_sha256(tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes, in name order) and metadata entry."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(meta):
        h.update(f"{key}|{meta[key]}|".encode())
    return h.hexdigest()


def run_identity(model: Any, config: Any, calibration: list[Tensor]) -> dict[str, Any]:
    """What must match for a journal to be resumed: model, config, calibration data."""
    model_config = getattr(model, "config", None)
    arch = json.dumps(model_config.to_dict() if hasattr(model_config, "to_dict") else {},
                      sort_keys=True, default=str)
    return {"model_class": type(model).__name__,
            "model_config_sha256": hashlib.sha256(arch.encode()).hexdigest(),
            "quantize_config": config.to_dict(),
            "calibration_sha256": calibration_sha256(calibration)}


class LayerJournal:
    """Finished layers of one run, in `path`; `identity` says which run (JSON-serialisable)."""

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any]):
        self.path = Path(path)
        self.identity = json.loads(json.dumps({"version": JOURNAL_VERSION, **identity},
                                              default=str))
        manifest = self.path / MANIFEST
        if manifest.exists():
            try:
                found = json.loads(manifest.read_text())
            except (OSError, ValueError) as e:
                raise JournalMismatch(f"{manifest} is unreadable ({e}); delete the folder "
                                      "or choose another resume_dir=") from None
            diff = sorted(k for k in set(found) | set(self.identity)
                          if found.get(k) != self.identity.get(k))
            if diff:
                raise JournalMismatch(
                    f"{self.path} holds layers of a different run ({', '.join(diff)} differ); "
                    "use the same model, method, arguments and calibration to resume, or "
                    "choose a new resume_dir=")
        elif self.path.exists() and any(self.path.iterdir()):
            raise JournalMismatch(f"{self.path} is not empty and holds no {MANIFEST}; "
                                  "choose an empty or new folder for resume_dir=")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(manifest, lambda tmp: tmp.write_text(json.dumps(self.identity, indent=2)))

    def _file(self, i: int) -> Path:
        return self.path / f"layer_{i:05d}.safetensors"

    def done(self, i: int) -> bool:
        return self._file(i).exists()

    def layers_done(self) -> int:
        return sum(1 for _ in self.path.glob("layer_*.safetensors"))

    def verify(self) -> int:
        """Read and check every finished layer file now (before any work); returns how many."""
        done = sorted(int(f.stem.partition("_")[2]) for f in self.path.glob("layer_*.safetensors")
                      if f.stem.partition("_")[2].isdigit())
        for i in done:
            self.load(i)
        return len(done)

    def save(self, i: int, codes: dict[str, Any], reports: list[Any]) -> None:
        """Store layer i's codes (linear name -> codes) and its linear reports, atomically."""
        from safetensors.torch import save_file

        tensors, layouts = {}, {}
        for name, c in codes.items():
            layout, packed = pack(c)
            layouts[name] = layout.to_dict()
            tensors.update({f"{name}.{k}": v.cpu() for k, v in packed.items()})
        meta = {"layouts": json.dumps(layouts),
                "reports": json.dumps([dataclasses.asdict(r) for r in reports])}
        meta["sha256"] = contents_sha256(tensors, meta)
        atomic_write(self._file(i), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def save_report(self, report: Any, layers_path: str, n_layers: int) -> None:
        """Store every layer of a finished run (a QuantizeReport with codes), e.g. to keep the
        work when saving the model failed; resuming from it restores every layer."""
        for i in range(n_layers):
            prefix = f"{layers_path}.{i}."
            codes = {k[len(prefix):]: c for k, c in report.codes.items() if k.startswith(prefix)}
            self.save(i, codes, [r for r in report.linears if r.name.startswith(prefix)])

    def load(self, i: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(linear name -> codes, reports as dicts) of layer i."""
        from safetensors import safe_open

        try:
            with safe_open(str(self._file(i)), framework="pt") as f:
                meta = dict(f.metadata() or {})
                stored = {k: f.get_tensor(k) for k in f.keys()}
            recorded = meta.pop("sha256", None)
            if recorded != contents_sha256(stored, meta):
                raise ValueError("its contents do not match the sha256 written with it")
            layouts = json.loads(meta["layouts"])
            reports = json.loads(meta["reports"])
        except Exception as e:  # noqa: BLE001 - any damage means: this layer is not usable
            raise JournalMismatch(f"{self._file(i)} is damaged ({type(e).__name__}: {e}); "
                                  "delete that file to quantize the layer again (the other "
                                  "finished layers are kept)") from None
        codes = {}
        for name, d in layouts.items():
            prefix = name + "."
            codes[name] = unpack(PackedLayout.from_dict(d),
                                 {k[len(prefix):]: v for k, v in stored.items()
                                  if k.startswith(prefix)})
        return codes, reports
