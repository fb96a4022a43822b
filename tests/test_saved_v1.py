"""Directories saved before the layout change (format_version 1) still load, with their logits.

tests/data/v1_<method>/ were written by binllm at c455a52 (the flat module layout) with
tests/data/make_v1_dirs.py, together with the logits that code computed in memory right after
binarizing; both loading paths of today's code must reproduce them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DATA = Path(__file__).resolve().parent / "data"
METHODS = ["billm", "pbllm-10", "gptq", "arb-llm-rc"]  # binary, partial-binary, uniform formats


@pytest.mark.parametrize("method", METHODS)
def test_v1_directory_loads_with_the_logits_it_was_saved_with(method):
    import binllm

    ref = load_file(str(DATA / f"v1_{method}_logits.safetensors"))
    model = binllm.load(DATA / f"v1_{method}")
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["billm", "pbllm-10"])
def test_v1_directory_loads_through_from_pretrained(method):
    import binllm  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM

    from binllm.packed.layers import BinaryLinear

    ref = load_file(str(DATA / f"v1_{method}_logits.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(DATA / f"v1_{method}")
    assert any(isinstance(m, BinaryLinear) for m in model.modules())
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-4, atol=1e-5)
