"""What tests/data/reference_pins.json pins, computed the same way by the test and by the script
(tests/make_reference_pins.py, run by hand only).

Input: the real stories260K LLaMA (../shared/models/stories260K) and the calibration windows
stored in the JSON itself (token ids, so neither the data files nor the tokenizer can move
them); one CPU thread. Per method (its default arguments) and per linear: the loop's proxy
loss before storage rounding (`calibration_loss`, the figure the reference code prints), the
loss of the stored weights (`loss`), two sha256 checksums of the stored codes (`int_sha256`
over the integer and boolean fields — sign planes, group ids, masks, integer levels — and
the structural metadata; `sha256` over every field, the fp16 scales and means included), and the
first sign plane of every weight (`signs`, all linears in order, packed bits, zlib, base64).

Why two tiers: the run is bit-for-bit deterministic for a given thread count on one machine,
but 1 and 2 threads sum in different orders, and on a 1-bit model a last-bit difference can
flip a sign that later columns then compensate (measured: losses move by up to 6.5e-5
relative, ≤ 0.0003 % of the signs flip). So checksums and exact losses are asserted only in the
environment the pins were made in (same torch, CPU, one thread); everywhere the losses must
agree to LOSS_RTOL and the sign planes to SIGN_AGREEMENT.
"""

from __future__ import annotations

import base64
import hashlib
import platform
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data" / "reference_pins.json"
# every paper method as registered, each with its default arguments (pbllm's defaults are the
# pbllm-10 preset: 10 % salient at 8 bits, Hessian saliency)
METHODS = ["pbllm-10", "billm", "arb", "arb-x", "arb-rc", "arb-llm-x", "arb-llm-rc"]
LOSS_RTOL = 5e-4       # 1 vs 2 threads: ≤ 6.5e-5; scale_rounding=in_loop: up to 0.27
SIGN_AGREEMENT = 0.999  # 1 vs 2 threads: ≥ 0.99994; scale_rounding=in_loop: 0.976–1.0


def environment() -> dict[str, str]:
    """What must match for the run to be bit-for-bit the pinned one (besides one thread)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu": model,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def first_sign_plane(codes) -> torch.Tensor:
    """(rows, cols) bool: plane 0 of BinaryCodes, the binarized signs of PartialBinaryCodes."""
    return codes.signs[0] if codes.signs.dim() == 3 else codes.signs


def encode_signs(planes: list[torch.Tensor]) -> str:
    bits = np.packbits(torch.cat([p.reshape(-1) for p in planes]).numpy())
    return base64.b64encode(zlib.compress(bits.tobytes(), 9)).decode()


def decode_signs(text: str, n: int) -> torch.Tensor:
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return torch.from_numpy(np.unpackbits(bits)[:n].astype(bool))


def codes_checksums(codes) -> dict[str, str]:
    """sha256 of the integer fields + structure (not scale_dtype), and of every field."""
    from binllm.methods.codes import codes_fields

    every, ints = hashlib.sha256(), hashlib.sha256()
    for name, value in codes_fields(codes).items():
        if isinstance(value, torch.Tensor):
            blob = (f"{name}:{value.dtype}:{tuple(value.shape)}:".encode()
                    + value.detach().cpu().contiguous().numpy().tobytes())
        else:
            blob = f"{name}={value!r}".encode()
        every.update(blob)
        if name != "scale_dtype" and not (isinstance(value, torch.Tensor)
                                          and value.is_floating_point()):
            ints.update(blob)
    return {"int_sha256": ints.hexdigest(), "sha256": every.hexdigest()}


def stories_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def method_pins(model_path: Path, method: str, windows: list[list[int]],
                method_args: dict | None = None) -> dict:
    """stories260K binarized by `method` on `windows`: per-linear losses and checksums, and
    the first sign plane of all linears (`signs`, encoded; `n_signs` bits)."""
    from binllm import QuantizeConfig, binarize_model

    model = stories_model(model_path)
    batches = [torch.tensor([w], dtype=torch.long) for w in windows]
    report = binarize_model(model, QuantizeConfig(method, method_args=method_args or {}),
                            batches)
    linears = [{"name": lin.name, "calibration_loss": lin.calibration_loss, "loss": lin.loss,
                **codes_checksums(report.codes[lin.name])} for lin in report.linears]
    planes = [first_sign_plane(report.codes[lin.name]) for lin in report.linears]
    return {"linears": linears, "n_signs": sum(p.numel() for p in planes),
            "signs": encode_signs(planes)}
