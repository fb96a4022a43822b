"""scale_dtype: fp16-rounded scales (default) or fp32 ones as the reference code keeps them.

With float32 the codes hold unrounded scales, dequantize() still equals the calibrated Q, the
packed format stores them as fp32 (bit-exact round trip, 32 bits per scale in the accounting)
and a saved model reproduces the in-memory logits.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_checkpoint import logits, quantize, tiny_biased_llama

from binllm.engine.binarize import binarize_model
from binllm.packed.checkpoint import load_binarized, save_binarized
from binllm.engine.config import QuantizeConfig
from binllm.methods import MethodArgumentError, get_method
from binllm.packed.layout import PackedLayout, pack, unpack
from binllm.engine.reconstruct import reconstruct

NAMES = ["rtn-sign", "gptq", "pbllm-10", "billm", "arb-x", "arb-llm-rc"]


def weights_and_hessian(rows=16, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, cols, generator=g)  # (tokens, cols)
    return torch.randn(rows, cols, generator=g), 2 * X.T @ X / X.shape[0]


def run(name: str, **args):
    W, H = weights_and_hessian()
    return reconstruct(W, H, get_method(name, args), block_size=32)


def float_tensors(tensors) -> list[torch.Tensor]:
    return [t for t in tensors.values() if t.is_floating_point()]


@pytest.fixture(scope="module", params=NAMES)
def fp32(request):
    return request.param, run(request.param, scale_dtype="float32")


def test_float32_keeps_unrounded_scales_and_codes_reproduce_Q(fp32):
    _, rec = fp32
    assert rec.codes.scale_dtype == "float32"
    assert torch.equal(rec.codes.dequantize(), rec.Q)
    _, tensors = pack(rec.codes)
    scales = torch.cat([t.reshape(-1) for t in float_tensors(tensors)])
    assert scales.dtype == torch.float32
    assert not torch.equal(scales.half().float(), scales)  # not all fp16-representable


def test_float32_round_trip_is_exact_and_bytes_match_stored_bits(fp32):
    _, rec = fp32
    layout, tensors = pack(rec.codes)
    assert layout.params["scale_dtype"] == "float32"
    again = PackedLayout.from_dict(layout.to_dict())  # as config.json stores it
    back = unpack(again, tensors)
    assert back.scale_dtype == "float32"
    assert torch.equal(back.dequantize(), rec.codes.dequantize())
    assert sum(t.nbytes for t in tensors.values()) * 8 == rec.codes.stored_bits()
    assert again.stored_bits() == rec.codes.stored_bits()


def test_float32_costs_16_more_bits_per_stored_scale(fp32):
    _, rec = fp32
    _, tensors = pack(rec.codes)
    n_scales = sum(t.numel() for t in float_tensors(tensors))
    as_fp16 = replace(rec.codes, scale_dtype="float16")  # same structure, 16-bit scales
    assert n_scales > 0
    assert rec.codes.stored_bits() - as_fp16.stored_bits() == 16 * n_scales


@pytest.mark.parametrize("name", NAMES)
def test_default_is_float16_and_unchanged(name, fp32):
    rec = run(name)
    explicit = run(name, scale_dtype="float16")
    assert rec.codes.scale_dtype == "float16"
    assert torch.equal(rec.Q, explicit.Q)
    assert torch.equal(rec.codes.dequantize(), rec.Q)
    layout, tensors = pack(rec.codes)
    assert layout.params["scale_dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in float_tensors(tensors))
    if fp32[0] == name:
        assert not torch.equal(fp32[1].Q, rec.Q)  # the option changes the result


def test_layouts_without_scale_dtype_read_as_float16():
    rec = run("billm")
    layout, tensors = pack(rec.codes)
    d = layout.to_dict()
    del d["params"]["scale_dtype"]  # a layout written before the param existed
    old = PackedLayout.from_dict(d)
    assert torch.equal(unpack(old, tensors).dequantize(), rec.Q)
    assert old.stored_bits() == rec.codes.stored_bits()


def test_bad_scale_dtype_is_refused():
    with pytest.raises(MethodArgumentError, match="float16, float32"):
        get_method("billm", {"scale_dtype": "bfloat16"})


@pytest.mark.parametrize("name", ["gptq", "pbllm-10", "arb-llm-rc"])
def test_float32_save_load_reproduces_the_logits(name, tmp_path):
    model = tiny_biased_llama()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 96, (1, 16), generator=g) for _ in range(2)]
    report = binarize_model(model, QuantizeConfig(method=name,
                                                  method_args={"scale_dtype": "float32"}), batches)
    assert report.method_args["scale_dtype"] == "float32"
    out = save_binarized(model, report, None, tmp_path / "model")
    loaded = load_binarized(out, kernels=False)  # the dequantize path: bit for bit
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.layout.params["scale_dtype"] == "float32"
    assert any(b.dtype == torch.float32 for b in q.packed().values())
    assert torch.equal(logits(loaded, 96), logits(model, 96))
    default = tiny_biased_llama()
    quantize(default, name, 96)  # fp16 scales: the option reaches the model
    assert not torch.equal(logits(default, 96), logits(model, 96))
