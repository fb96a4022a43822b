"""BinaryLinear: forward from packed buffers, state_dict keys, dtype/device moves, caching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from packed_codes import HAND_BUILT
from torch import nn

from binllm.packed.layers import BinaryLinear, replace_linears, set_cache_dequantized
from binllm.packed.layout import PackedLayout, pack
from binllm.packed.packing import PackingError


@pytest.mark.parametrize("kind", ["billm-like", "rc-cgb-like", "uniform-3bit", "pb-3bit-grouped"])
def test_forward_equals_linear_on_the_codes_dequantize(kind):
    codes = HAND_BUILT[kind]()
    rows, cols = codes.shape
    bias = torch.randn(rows)
    layer = BinaryLinear.from_codes(codes, bias, kernels=False)  # the reference path
    x = torch.randn(3, 4, cols)
    assert torch.equal(layer(x), F.linear(x, codes.dequantize(), bias))
    assert torch.equal(layer.dequantize(), codes.dequantize())
    fast = BinaryLinear.from_codes(codes, bias)  # the default: kernels, to fp32 round-off
    torch.testing.assert_close(fast(x), F.linear(x, codes.dequantize(), bias),
                               rtol=1e-5, atol=1e-5)


def test_state_dict_keys_are_the_packed_tensor_names():
    codes = HAND_BUILT["billm-like"]()
    layout, tensors = pack(codes)
    layer = BinaryLinear.from_codes(codes, torch.zeros(codes.shape[0]))
    sd = layer.state_dict()
    assert set(sd) == set(layout.specs()) | {"bias"}
    for k, t in tensors.items():
        assert torch.equal(sd[k], t)
    assert layer.stored_bits() == codes.stored_bits()


def test_dtype_moves_keep_the_packed_buffers_exact():
    codes = HAND_BUILT["rc-like"]()
    layer = BinaryLinear.from_codes(codes, torch.randn(codes.shape[0]))
    before = {k: v.clone() for k, v in layer.packed().items()}
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert all(torch.equal(layer.packed()[k], v) and layer.packed()[k].dtype == v.dtype
               for k, v in before.items())
    y = layer(torch.randn(2, codes.shape[1], dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    layer.to("meta")
    assert all(t.is_meta for t in layer.packed().values())


def test_cache_dequantized_reuses_the_weight_and_is_dropped_when_buffers_change():
    codes = HAND_BUILT["uniform-3bit"]()
    layer = BinaryLinear.from_codes(codes, cache_dequantized=True)
    x = torch.randn(2, codes.shape[1])
    y1 = layer(x)
    cached = layer._cached
    assert cached is not None
    assert torch.equal(layer(x), y1) and layer._cached is cached
    other = BinaryLinear.from_codes(type(codes)(**{**codes.__dict__, "zero": codes.zero.flip(0)}))
    layer.load_state_dict(other.state_dict())
    assert layer._cached is None
    assert torch.equal(layer(x), F.linear(x, other.dequantize()))


def test_extra_repr_reports_bits_per_weight():
    codes = HAND_BUILT["billm-like"]()
    text = repr(BinaryLinear.from_codes(codes))
    n = codes.shape[0] * codes.shape[1]
    assert f"bits/weight={codes.stored_bits() / n:.3f}" in text and "format=binary" in text


def test_replace_linears_swaps_by_name_and_checks_shapes():
    model = nn.Sequential(nn.Linear(77, 5), nn.ReLU(), nn.Linear(5, 2, bias=False))
    layout, _ = pack(HAND_BUILT["billm-like"]())
    swapped = replace_linears(model, {"0": layout}, device="meta")
    assert isinstance(model[0], BinaryLinear) and set(swapped) == {"0"}
    assert model[0].bias is not None and model[0].bias.is_meta
    with pytest.raises(PackingError, match="shape \\(2, 5\\)"):
        replace_linears(model, {"2": layout})
    with pytest.raises(PackingError, match="does not have"):
        replace_linears(model, {"9": layout})
    assert set_cache_dequantized(model, True) == 1 and model[0].cache_dequantized


def test_buffers_allocate_from_the_layout_before_any_data():
    layout = PackedLayout.from_dict(pack(HAND_BUILT["pb-8bit"]())[0].to_dict())
    layer = BinaryLinear(layout, bias=False, device="meta")
    assert {k: tuple(v.shape) for k, v in layer.packed().items()} == \
        {k: s.shape for k, s in layout.specs().items()}


@pytest.mark.parametrize("fast", [True, False])
def test_held_dense_weight_of_a_bf16_input_is_f_linear_of_the_bf16_weight(fast, monkeypatch):
    """hold_dense with bf16 x: F.linear(x, Ŵ.bf16(), bias) exactly where the CPU multiplies bf16
    in hardware; elsewhere the same bf16 weights held in fp32, y rounded once (to bf16
    round-off of the reference); an fp32 x afterwards gets Ŵ itself, not the rounded copy."""
    from binllm.kernels import cpu

    monkeypatch.setattr(cpu, "fast_bf16_matmul", lambda flags=None: fast)
    codes = HAND_BUILT["rc-like"]()
    rows, cols = codes.shape
    layer = BinaryLinear.from_codes(codes, torch.randn(rows))
    layer.hold_dense(True)
    W, b = codes.dequantize(), layer.bias
    x = torch.randn(40, cols).bfloat16()
    with torch.no_grad():
        y = layer(x)
        ref = F.linear(x, W.bfloat16(), b.bfloat16())
        assert y.dtype == torch.bfloat16 and layer._dense.dtype == (
            torch.bfloat16 if fast else torch.float32)
        if fast:
            assert torch.equal(y, ref)
        else:
            assert torch.equal(layer._dense, W.bfloat16().float())
            exact = F.linear(x.float(), W.bfloat16().float(), b.bfloat16().float())
            assert torch.equal(y, exact.bfloat16())
            bound = 2 ** -7 * exact.abs() + 1e-30  # one bf16 rounding of y
            assert ((y.float() - ref.float()).abs() <= 2 * bound).all()
        x32 = torch.randn(3, cols)
        torch.testing.assert_close(layer(x32), F.linear(x32, W, b), rtol=1e-5, atol=1e-5)
