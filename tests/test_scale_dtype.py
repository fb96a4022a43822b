"""scale_dtype: fp16-stored scales (default) or fp32 ones; scale_rounding: when they are rounded.

Calibration keeps scales and means fp32 as the reference code does; by default they are
rounded to fp16 once, after the layer's loop (scale_rounding=after), so the default's signs and
levels are exactly those of scale_dtype=float32 and its scales are those rounded.
scale_rounding=in_loop rounds them before Ŵ and the feedback (a named option).
With float32 the codes hold unrounded scales, dequantize() still equals Q, the packed format
stores them as fp32 (bit-exact round trip, 32 bits per scale in the accounting) and a saved
model reproduces the in-memory logits.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_checkpoint import logits, tiny_biased_llama

from binllm.engine.binarize import binarize_model
from binllm.packed.checkpoint import load_binarized, save_binarized
from binllm.engine.config import QuantizeConfig
from binllm.methods import MethodArgumentError, get_method
from binllm.methods.codes import codes_fields, round_scales
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


def same_codes(a, b) -> bool:
    fa, fb = codes_fields(a), codes_fields(b)
    return fa.keys() == fb.keys() and all(
        torch.equal(x, fb[k]) if isinstance(x, torch.Tensor) else x == fb[k]
        for k, x in fa.items())


def test_default_stores_float16_and_equals_the_float32_run_rounded_once(fp32):
    name, rec32 = fp32
    rec = run(name)
    explicit = run(name, scale_dtype="float16", scale_rounding="after")
    assert rec.codes.scale_dtype == "float16"
    assert torch.equal(rec.Q, explicit.Q)
    assert torch.equal(rec.codes.dequantize(), rec.Q)
    # the same calibration as scale_dtype=float32 (the reference), rounded only for storage
    assert same_codes(rec.codes, round_scales(rec32.codes, "float16"))
    assert rec.calibration_loss == rec32.loss == rec32.calibration_loss
    assert not torch.equal(rec32.Q, rec.Q)  # the storage precision changes the weights
    layout, tensors = pack(rec.codes)
    assert layout.params["scale_dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in float_tensors(tensors))


def test_stored_loss_is_that_of_the_rounded_weights(fp32):
    name, _ = fp32
    rec = run(name)
    # rounding moves every weight by at most half an fp16 step of its scales: a small change
    assert rec.loss != rec.calibration_loss
    assert rec.loss == pytest.approx(rec.calibration_loss, rel=2e-2)
    if name == "rtn-sign":  # no Hessian feedback: the loss is Σ (w − q)²/U_jj²/2 on W itself
        W, _ = weights_and_hessian()
        assert rec.loss == pytest.approx(((W - rec.Q) ** 2).sum().item() / 2, rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_in_loop_rounds_before_the_feedback(name):
    rec = run(name, scale_rounding="in_loop")
    assert rec.codes.scale_dtype == "float16"
    assert torch.equal(rec.codes.dequantize(), rec.Q)
    assert rec.loss == rec.calibration_loss  # nothing left to round after the loop
    _, tensors = pack(rec.codes)
    assert all(t.dtype == torch.float16 for t in float_tensors(tensors))
    if name not in ("rtn-sign",):  # with feedback the rounding changes later columns' codes
        assert not same_codes(rec.codes, run(name).codes)


def test_bad_scale_rounding_is_refused():
    with pytest.raises(MethodArgumentError, match="after, in_loop"):
        get_method("arb-llm-x", {"scale_rounding": "before"})


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
@pytest.mark.parametrize("args", [{"scale_dtype": "float32"}, {"scale_rounding": "in_loop"}])
def test_options_save_load_reproduce_the_logits(name, args, tmp_path):
    model, report = binarized(name, args)
    assert all(report.method_args[k] == v for k, v in args.items())
    for path, codes in report.codes.items():  # the model computes with the stored codes
        weight = model.get_submodule(path).weight
        assert torch.equal(codes.dequantize(), weight)
    out = save_binarized(model, report, None, tmp_path / "model")
    loaded = load_binarized(out, kernels=False)  # the dequantize path: bit for bit
    q = loaded.model.layers[0].self_attn.q_proj
    dtype = args.get("scale_dtype", "float16")
    assert q.layout.params["scale_dtype"] == dtype
    assert any(b.dtype == getattr(torch, dtype) for b in q.packed().values())
    assert torch.equal(logits(loaded, 96), logits(model, 96))
    default, _ = binarized(name, {})  # the option reaches the model
    assert not torch.equal(logits(default, 96), logits(model, 96))


def binarized(name: str, args: dict):
    """The tiny LLaMA binarized with blocks of 32 columns (its linears are 60 and 76 wide, so
    block-feedback methods feed errors forward too)."""
    model = tiny_biased_llama()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 96, (1, 16), generator=g) for _ in range(2)]
    config = QuantizeConfig(method=name, method_args=args, block_size=32)
    return model, binarize_model(model, config, batches)


@pytest.mark.parametrize("name", ["pbllm-10", "arb-llm-x"])
def test_default_calibrates_the_whole_model_as_float32(name):
    """Layer 1 is calibrated on what the fp32-calibrated layer 0 outputs, as in the references;
    only then does layer 0 get its fp16-stored weights."""
    from conftest import tiny_llama

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (1, 32), generator=g) for _ in range(2)]
    runs = []
    for args in ({}, {"scale_dtype": "float32"}):
        model = tiny_llama()
        config = QuantizeConfig(method=name, method_args=args, block_size=32)
        runs.append((model, binarize_model(model, config, batches)))
    (model, default), (_, fp32) = runs
    assert [r.calibration_loss for r in default.linears] == [r.loss for r in fp32.linears]
    assert [r.loss for r in default.linears] != [r.loss for r in fp32.linears]
    assert len(default.codes) == 14
    for path, codes in default.codes.items():
        assert same_codes(codes, round_scales(fp32.codes[path], "float16")), path
        assert torch.equal(codes.dequantize(), model.get_submodule(path).weight)
