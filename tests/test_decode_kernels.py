"""The decode path of the compiled CPU kernels: a layer's bound decoder (one form_gemv call per
stage, cpu.bind_decoder) against the registry's per-call path, what it declines, and how it
follows the layer (copies, pickles, moves, settings)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from packed_codes import HAND_BUILT
from test_cpu_kernels import SHAPES, check, check_bf16, inputs, needs_extension
from test_kernel_form import layer

from binllm.engine.reconstruct import reconstruct
from binllm.kernels import cpu, cpu_build
from binllm.kernels.form import kernel_form
from binllm.methods import METHODS, get_method
from binllm.packed.layers import BinaryLinear, set_kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def decoded(layer_, x):
    """layer_(x) with its decoder bound (the first call binds it) and taking x."""
    with torch.no_grad():
        layer_(x)
        assert isinstance(layer_._decode, cpu.extension().module.Decoder)
        y = layer_._decode(x, layer_.bias)
        assert y is not None
        assert torch.equal(layer_(x), y)
    return y


def check_decode(codes, xs, bias=None):
    """For each x and dtype: the decoder's y equals form_linear's (the per-call path: fp32 sums,
    .to(x.dtype), + bias.to(x.dtype)) bit for bit, and F.linear(x, Ŵ, bias) to round-off."""
    from binllm.kernels import form_linear

    Q = codes.dequantize()
    for dtype in DTYPES:
        layer_ = BinaryLinear.from_codes(codes, bias).to(dtype)
        b = None if bias is None else layer_.bias
        for x in xs:
            x = x.to(dtype)
            y = decoded(layer_, x)
            assert y.dtype == dtype and y.shape == (*x.shape[:-1], codes.shape[0])
            with torch.no_grad():
                assert torch.equal(y, form_linear(layer_.kernel_form(), x, b))
            x2 = x.reshape(-1, codes.shape[1]).float()
            y2 = y.reshape(x2.shape[0], -1).float() - (0 if b is None else b.float())
            if dtype == torch.float32:
                check(y2, x2, Q)
            else:  # one rounding of y (and of y + bias) in x's dtype
                ref = F.linear(x2, Q, None if b is None else b.float()) - (
                    0 if b is None else b.float())
                scale = x2.abs() @ Q.abs().T + (0 if b is None else b.float().abs())
                assert ((y2 - ref).abs() <= 2 ** -7 * scale + 1e-30).all()


@needs_extension
@pytest.mark.parametrize("name", list(METHODS))
def test_decode_equals_the_per_call_path_for_every_method(name):
    """Odd shapes, 2-D and 3-D x of 1 to GEMV_MAX rows (SMALL_BATCH chunks), with a bias."""
    for rows, cols, block in SHAPES[1:]:
        W, H = layer(rows, cols)
        codes = reconstruct(W, H, get_method(name), block_size=block).codes
        xs = [inputs(1, cols), inputs(3, cols).reshape(1, 3, cols),
              inputs(2 * cpu.SMALL_BATCH + 3, cols), inputs(cpu.GEMV_MAX, cols).reshape(4, 8, cols)]
        check_decode(codes, xs, torch.randn(rows))


@needs_extension
@pytest.mark.parametrize("kind", list(HAND_BUILT))
def test_decode_on_hand_built_codes(kind):
    """Every codes type: sparse parts (PB-LLM), x versions (RC), chains (binary-factor)."""
    codes = HAND_BUILT[kind]()
    rows, cols = codes.shape
    check_decode(codes, [inputs(1, cols).reshape(1, 1, cols), inputs(cpu.SMALL_BATCH + 1, cols)])
    check_decode(codes, [inputs(2, cols)], torch.randn(rows))


@needs_extension
@pytest.mark.parametrize("impl", list(cpu.IMPLS))
def test_decoder_equals_form_matmul_with_either_impl(impl):
    """form_gemv runs the loops of `impl` (AVX-512 or portable) as form_matmul does."""
    for kind in ("rc-cgb-like", "uniform-3bit", "pb-3bit-grouped", "factor-r5"):
        codes = HAND_BUILT[kind]()
        form = kernel_form(codes)
        for N in (1, cpu.SMALL_BATCH + 3):
            x = inputs(N, codes.shape[1])
            ref = cpu.form_matmul(form, x, impl)
            for dtype in DTYPES:
                y = cpu.bind_decoder(form, impl)(x.to(dtype), None)
                assert torch.equal(y, cpu.form_matmul(form, x.to(dtype), impl).to(dtype))
            assert torch.equal(cpu.bind_decoder(form, impl)(x, None), ref)


@needs_extension
def test_decoder_declines_what_it_does_not_compute():
    """Gradients wanted, more than GEMV_MAX rows, fp64: the registry's path computes them."""
    codes = HAND_BUILT["rc-like"]()
    rows, cols = codes.shape
    layer_ = BinaryLinear.from_codes(codes, torch.randn(rows))
    decoded(layer_, inputs(1, cols))
    dec = layer_._decode
    assert dec(inputs(cpu.GEMV_MAX + 1, cols), None) is None
    assert dec(inputs(1, cols).double(), None) is None
    assert dec(inputs(1, cols + 8), None) is None  # a wrong width: the registry's path
    x = inputs(2, cols).requires_grad_()
    assert dec(x, None) is None
    layer_(x).sum().backward()
    torch.testing.assert_close(x.grad, codes.dequantize().sum(0).expand(2, -1))
    layer_.bias.requires_grad_()
    assert dec(inputs(1, cols), layer_.bias) is None
    with torch.no_grad():
        assert dec(inputs(1, cols), layer_.bias) is not None
    big = inputs(cpu.GEMV_MAX + 1, cols).bfloat16()  # the bf16 prefill path
    unbiased = BinaryLinear.from_codes(codes)
    decoded(unbiased, inputs(1, cols))
    assert unbiased._decode(big, None) is None
    check_bf16(unbiased(big), big, codes.dequantize())


@needs_extension
def test_decode_skips_the_per_call_path_and_rounds_a_bias_of_another_dtype(monkeypatch):
    """After the first call (the registry's path, which binds the decoder) no Python dispatch
    runs; an fp32 bias with bf16 x is rounded to bf16 first, as bias.to(x.dtype) is."""
    from binllm.kernels import form_linear
    from binllm.packed import layers

    codes = HAND_BUILT["cgb-like"]()
    rows, cols = codes.shape
    layer_ = BinaryLinear.from_codes(codes, torch.randn(rows))
    calls = []
    monkeypatch.setattr(layers, "form_linear", lambda *a: calls.append(1) or form_linear(*a))
    x = inputs(1, cols).bfloat16()
    first = layer_(x)
    assert len(calls) == 1 and first.dtype == torch.bfloat16
    for _ in range(3):
        assert torch.equal(layer_(x), first)
    assert len(calls) == 1
    assert torch.equal(first, form_linear(layer_.kernel_form(), x, layer_.bias.bfloat16()))


@needs_extension
def test_decoder_follows_the_form_and_the_layers_settings():
    """Dropped with the form (moves, new buffers, set_kernels), bound to a deep copy's own form;
    kernels=False or cache_dequantized set directly take the reference path at once."""
    import copy

    codes = HAND_BUILT["billm-like"]()
    rows, cols = codes.shape
    layer_ = BinaryLinear.from_codes(codes, torch.randn(rows))
    x = inputs(1, cols)
    decoded(layer_, x)
    twin = copy.deepcopy(layer_)
    assert twin._decode is None
    decoded(twin, x)
    planes = twin._decode.stages[0][1][2]
    assert planes.data_ptr() == twin.kernel_form().parts[0].planes.data_ptr()
    assert planes.data_ptr() != layer_.kernel_form().parts[0].planes.data_ptr()
    layer_.to(torch.bfloat16)
    assert layer_._decode is None
    decoded(layer_, x.bfloat16())
    layer_.kernels = False
    ref = F.linear(x.bfloat16(), codes.dequantize().bfloat16(), layer_.bias)
    assert torch.equal(layer_(x.bfloat16()), ref)
    layer_.kernels, layer_.cache_dequantized = True, True
    assert torch.equal(layer_(x.bfloat16()), ref)
    layer_.cache_dequantized = False
    set_kernels(torch.nn.Sequential(layer_), False)
    assert layer_._decode is None and layer_._form is None


def test_form_decoder_follows_the_registry(monkeypatch):
    """The decoder of the kernel that computes x; `declines` where that kernel has none (the
    pure-PyTorch fallback), and the layer still computes through the registry."""
    from binllm.kernels import backends, form_decoder

    codes = HAND_BUILT["pb-8bit"]()
    form, x = kernel_form(codes), inputs(1, codes.shape[1])
    if cpu.extension().ok:
        assert isinstance(form_decoder(form, x), cpu.extension().module.Decoder)
    off = cpu_build.ExtensionStatus(False, "no compiler here")
    monkeypatch.setattr(cpu, "extension", lambda: off)
    assert form_decoder(form, x) is backends.declines
    layer_ = BinaryLinear.from_codes(codes)
    for _ in range(2):
        check(layer_(x), x, codes.dequantize())
    assert layer_._decode is backends.declines
    cpu._warn_once.cache_clear()



@needs_extension
def test_a_pickled_layer_rebinds_its_decoder_and_computes_the_same():
    """pickle drops the bound decoder (a compiled object); the loaded layer binds its own."""
    import pickle

    codes = HAND_BUILT["billm-like"]()
    rows, cols = codes.shape
    layer_ = BinaryLinear.from_codes(codes, torch.randn(rows))
    x = inputs(1, cols)
    y = decoded(layer_, x)
    twin = pickle.loads(pickle.dumps(layer_))
    assert twin._decode is None
    assert torch.equal(decoded(twin, x), y)
    assert twin._decode is not layer_._decode


@needs_extension
def test_decoder_reads_x_in_place_by_the_parts_flags_and_checks_them():
    """A q1_0 part flagged in order (x read in place) gives the gathered path's bits; a flag on
    a permuted, padded part (BiLLM's) is refused when the decoder is built."""
    Decoder = cpu.extension().module.Decoder
    W, H = layer(21, 256)
    form = kernel_form(reconstruct(W, H, get_method("q1_0"), block_size=128).codes)
    rows, parts, sparse, gs, flags = cpu._gemv_args(form)
    assert flags == [1]
    x = inputs(3, 256)
    for impl in cpu.IMPLS.values():
        ys = [Decoder([(rows, parts, sparse, gs, [f])], 256, 3 * 256, impl)(x, None)
              for f in (1, 0)]
        assert torch.equal(ys[0], ys[1])
    form = kernel_form(HAND_BUILT["billm-like"]())
    rows, parts, sparse, gs, flags = cpu._gemv_args(form)
    assert flags == [0] * len(form.parts)
    with pytest.raises(RuntimeError, match="not in order"):
        Decoder([(rows, parts, sparse, gs, [1] * len(flags))], form.cols, form.cols, 0)


@needs_extension
def test_a_bound_decoder_holds_one_tile_major_copy_of_the_coefficients_and_says_so():
    """The decoder's own bytes are each part's coefficients padded to whole row tiles, and the
    layer's held_bytes counts them beside its form once the decoder is bound."""
    codes = reconstruct(*layer(37, 300), get_method("billm"), block_size=128).codes
    layer_ = BinaryLinear.from_codes(codes, None)
    form = layer_.kernel_form()
    before = layer_.held_bytes()
    decoded(layer_, inputs(1, 300))
    copy = sum(p.coef.shape[0] * p.coef.shape[1] * -(-form.rows // 16) * 16
               * p.coef.element_size() for p in form.parts)
    assert copy > 0 and layer_._decode.nbytes == copy
    assert layer_.held_bytes() == before + copy
