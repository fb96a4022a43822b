"""What tests/data/reference_pins.json pins, computed the same way by the test and by the script.

Input: the real stories260K LLaMA (../shared/models/stories260K) and the calibration windows
stored in the JSON itself (token ids, so neither the data files nor the tokenizer can move
them). Per method and per linear: the loop's proxy loss before storage rounding
(`calibration_loss`, the figure the reference code prints), the loss of the stored weights
(`loss`), and two sha256 checksums of the stored codes: `int_sha256` over the integer and
boolean fields (sign planes, group ids, masks, levels, zero points) and the layout metadata,
`sha256` over every field (the fp16-rounded scales and means included).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data" / "reference_pins.json"
# every paper method as registered, the PB-LLM preset and the plain defaults of pbllm
METHODS = ["pbllm-10", "pbllm", "billm", "arb", "arb-x", "arb-rc", "arb-llm-x", "arb-llm-rc"]


def codes_checksums(codes) -> dict[str, str]:
    """sha256 of the integer fields + metadata, and of every field, in field order."""
    from binllm.methods.codes import codes_fields

    every, ints = hashlib.sha256(), hashlib.sha256()
    for name, value in codes_fields(codes).items():
        if isinstance(value, torch.Tensor):
            blob = (f"{name}:{value.dtype}:{tuple(value.shape)}:".encode()
                    + value.detach().cpu().contiguous().numpy().tobytes())
        else:
            blob = f"{name}={value!r}".encode()
        every.update(blob)
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            ints.update(blob)
    return {"int_sha256": ints.hexdigest(), "sha256": every.hexdigest()}


def stories_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def method_pins(model_path: Path, method: str, windows: list[list[int]],
                method_args: dict | None = None) -> list[dict]:
    """Per linear of stories260K binarized by `method` on `windows`: losses and checksums."""
    from binllm import QuantizeConfig, binarize_model

    model = stories_model(model_path)
    batches = [torch.tensor([w], dtype=torch.long) for w in windows]
    report = binarize_model(model, QuantizeConfig(method, method_args=method_args or {}),
                            batches)
    out = []
    for lin in report.linears:
        out.append({"name": lin.name, "calibration_loss": lin.calibration_loss,
                    "loss": lin.loss, **codes_checksums(report.codes[lin.name])})
    return out
