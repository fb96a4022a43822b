"""CPU kernels of the kernel form against the plain dequantized path, and their fallback."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from packed_codes import HAND_BUILT
from test_kernel_form import layer

from binllm.engine.reconstruct import reconstruct
from binllm.kernels import cpu
from binllm.kernels.form import kernel_form
from binllm.kernels.form_ref import stages_of
from binllm.methods import METHODS, get_method
from binllm.packed.layers import BinaryLinear, set_kernels

needs_extension = pytest.mark.skipif(not cpu.extension().ok, reason=cpu.extension().reason)
# decode, small batches, chunked GEMV, prefill (dense rebuild + GEMM)
BATCHES = [1, 2, 5, cpu.SMALL_BATCH, cpu.SMALL_BATCH + 3, cpu.GEMV_MAX + 8]
# (rows, cols, block): one row; a row tile and a partial one, columns not a multiple of 128
SHAPES = [(1, 37, 16), (11, 200, 128), (37, 300, 128)]


def check(y, x, W):
    """y ≈ x Wᵀ to fp32 round-off, scaled by |x| |W|ᵀ."""
    ref = x.double() @ W.double().T
    bound = 1e-5 * (x.abs().double() @ W.abs().double().T) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all(), float(((y - ref) / bound).abs().max())


def inputs(N, cols, seed=2):
    x = torch.randn(N, cols, generator=torch.Generator().manual_seed(seed))
    x[:, 0] *= 20
    return x


@needs_extension
@pytest.mark.parametrize("impl", list(cpu.IMPLS))
@pytest.mark.parametrize("name", list(METHODS))
def test_cpu_kernels_equal_the_dequantized_product_for_every_method(name, impl):
    for rows, cols, block in SHAPES:
        W, H = layer(rows, cols)
        codes = reconstruct(W, H, get_method(name), block_size=block).codes
        form, Q = kernel_form(codes), codes.dequantize()
        for N in BATCHES:
            x = inputs(N, cols)
            check(cpu.form_matmul(form, x, impl), x, Q)


@needs_extension
@pytest.mark.parametrize("kind", list(HAND_BUILT))
def test_cpu_kernels_on_hand_built_codes(kind):
    codes = HAND_BUILT[kind]()
    form, Q = kernel_form(codes), codes.dequantize()
    for N in BATCHES:
        x = inputs(N, codes.shape[1])
        for impl in cpu.IMPLS:
            check(cpu.form_matmul(form, x, impl), x, Q)


@needs_extension
def test_cpu_kernels_on_a_wider_layer_with_every_row_tile():
    """4·k + 3 rows (the tail of the 4-row tiles), several 128-column blocks, 3 salient groups."""
    from packed_codes import binary_codes

    codes = binary_codes(rows=67, cols=515, block=128, orders=(2, 2, 1, 1), n_salient=2,
                         mean=False, beta=True, seed=4)
    form, Q = kernel_form(codes), codes.dequantize()
    for N in BATCHES:
        x = inputs(N, 515)
        check(cpu.form_matmul(form, x), x, Q)


def test_fallback_warns_once_and_computes_the_same(monkeypatch, caplog):
    codes = HAND_BUILT["pb-3bit-grouped"]()
    form, Q = kernel_form(codes), codes.dequantize()
    monkeypatch.setattr(cpu, "extension", lambda: cpu.ExtensionStatus(False, "no compiler here"))
    cpu._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="binllm.kernels.cpu"):
        for N in (1, 12):
            x = inputs(N, codes.shape[1])
            check(cpu.form_matmul(form, x), x, Q)
    warned = [r for r in caplog.records if "no compiler here" in r.getMessage()]
    assert len(warned) == 1
    cpu._warn_once.cache_clear()


def test_inputs_that_need_gradients_take_the_differentiable_path():
    codes = HAND_BUILT["billm-like"]()
    layer_ = BinaryLinear.from_codes(codes)
    x = inputs(2, codes.shape[1]).requires_grad_()
    layer_(x).sum().backward()
    torch.testing.assert_close(x.grad, codes.dequantize().sum(0).expand(2, -1))


def test_binary_linear_uses_the_kernels_by_default_and_keeps_no_weight(monkeypatch):
    codes = HAND_BUILT["rc-cgb-like"]()
    rows, cols = codes.shape
    layer_ = BinaryLinear.from_codes(codes, torch.randn(rows))
    calls = []
    real = cpu.form_matmul
    monkeypatch.setattr(cpu, "form_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = inputs(6, cols).to(torch.bfloat16)
    y = layer_(x.reshape(2, 3, cols))
    assert calls and y.shape == (2, 3, rows) and y.dtype == torch.bfloat16
    ref = F.linear(x.float(), codes.dequantize(), layer_.bias.float()).reshape(2, 3, rows)
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    assert layer_._cached is None
    big = [t for p in layer_.kernel_form().parts for t in (p.coef,)
           if t.is_floating_point() and t.numel() >= rows * cols]
    assert not big  # only bits and per-(row, segment) coefficients
    assert set_kernels(torch.nn.Sequential(layer_), False) == 1
    assert torch.equal(layer_(x.float()), F.linear(x.float(), codes.dequantize(), layer_.bias))
    layer_.kernels = True
    layer_.load_state_dict(BinaryLinear.from_codes(HAND_BUILT["rc-cgb-like"](),
                                                   torch.zeros(rows)).state_dict())
    assert layer_._form is None  # new buffers: the form is derived again


@needs_extension
def test_cpu_kernels_split_wide_layers_into_column_passes():
    """Tables of 8 inputs over 3300 columns (× 2 x versions for ARB-RC) exceed one pass's
    budget: segments (128-column blocks, a GPTQ group spanning the whole row) are split across
    passes and each constant term is counted once."""
    from packed_codes import binary_codes, uniform_codes

    for codes in (binary_codes(rows=21, cols=3300, block=128, orders=(2, 1, 1), n_salient=1,
                               mean=True, beta=True, seed=5),
                  uniform_codes(rows=21, cols=3300, bits=2, groupsize=3300, seed=5)):
        form, Q = kernel_form(codes), codes.dequantize()
        for N in (5, 8):
            x = inputs(N, 3300)
            for impl in cpu.IMPLS:
                check(cpu.form_matmul(form, x, impl), x, Q)


# -- prefill of bf16 inputs: F.linear(x, Ŵ.to(torch.bfloat16)), the reference forward ---------
BF16_METHODS = ["q1_0", "rtn-sign", "arb-llm-rc", "billm", "pbllm", "gptq"]


def check_bf16(y, x, W):
    """y ≈ F.linear(x, W.bfloat16()) for bf16 x: to one bf16 step of the output (the fp32 sums
    may differ in order) and half a step of the weights (a weight rebuilt in fp32 with another
    round-off may round to the neighbouring bf16); nearly every entry equal."""
    assert y.dtype == torch.bfloat16
    ref = F.linear(x, W.bfloat16()).float()
    bound = 2 ** -7 * ref.abs() + 2 ** -9 * (x.float().abs() @ W.abs().T) + 1e-30
    err = (y.float() - ref).abs()
    assert (err <= bound).all(), float((err / bound).max())
    assert (y.float() == ref).float().mean() >= 0.9


@needs_extension
@pytest.mark.parametrize("impl", list(cpu.IMPLS))
@pytest.mark.parametrize("name", BF16_METHODS)
def test_bf16_prefill_is_f_linear_of_the_bf16_weight(name, impl, monkeypatch):
    """Rows rebuilt in bf16 in chunks of 24 (chunks start inside a 16-row tile), odd shapes;
    the fp32 prefill of the same input stays exact."""
    monkeypatch.setattr(cpu, "ROW_CHUNK", 24)
    monkeypatch.setattr(cpu, "BF16_CHUNK_BYTES", 0)
    for rows, cols, block in SHAPES:
        W, H = layer(rows, cols)
        codes = reconstruct(W, H, get_method(name), block_size=block).codes
        form, Q = kernel_form(codes), codes.dequantize()
        for N in (cpu.GEMV_MAX + 1, 70):
            x = inputs(N, cols)
            check_bf16(cpu.form_matmul(form, x.bfloat16(), impl), x.bfloat16(), Q)
            check(cpu.form_matmul(form, x, impl), x, Q)


@needs_extension
@pytest.mark.parametrize("kind", list(HAND_BUILT))
def test_bf16_prefill_on_hand_built_codes(kind, monkeypatch):
    """Every codes type; a ChainForm (binary-factor) keeps the fp32 path for bf16 x too."""
    monkeypatch.setattr(cpu, "ROW_CHUNK", 16)
    monkeypatch.setattr(cpu, "BF16_CHUNK_BYTES", 0)
    codes = HAND_BUILT[kind]()
    form, Q = kernel_form(codes), codes.dequantize()
    x = inputs(cpu.GEMV_MAX + 8, codes.shape[1]).bfloat16()
    for impl in cpu.IMPLS:
        y = cpu.form_matmul(form, x, impl)
        if kind.startswith("factor"):
            assert torch.equal(y, cpu.form_matmul(form, x.float(), impl))
        else:
            check_bf16(y, x, Q)


def rebuilt_bf16(part, r0, n, impl):
    """Rows [r0, r0 + n) of a part rebuilt in bf16 into a column slice of a wider buffer."""
    buf = torch.full((n, part.width + 24), 7.0, dtype=torch.bfloat16)
    no_scale = torch.empty(0)
    torch.ops.binllm_cpu.bitpart_dense_bf16(
        part.planes, part.terms, part.cptr, part.cidx, part.fac, part.coef, part.seg,
        no_scale if part.scale is None else part.scale, r0, buf[:, 8:8 + part.width],
        cpu.IMPLS[impl])
    assert bool((buf[:, :8] == 7).all() and (buf[:, 8 + part.width:] == 7).all())
    return buf[:, 8:8 + part.width]


@needs_extension
@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_rebuild_is_the_same_bits_with_either_impl(name):
    """AVX-512's rebuild (a blend of two bf16 values per row and segment for one-plane forms
    such as q1_0 and rtn-sign, masked adds otherwise) writes the portable loop's bits: odd
    widths, segments of 1 to 16 bytes, row ranges starting inside a tile."""
    for rows, cols, block in SHAPES + [(40, 203, 8), (21, 96, 32)]:
        W, H = layer(rows, cols)
        codes = reconstruct(W, H, get_method(name), block_size=block).codes
        for stage in stages_of(kernel_form(codes)):
            for part in stage.parts:
                for r0, n in ((0, stage.rows), (stage.rows // 3, stage.rows - stage.rows // 3)):
                    if n:
                        assert torch.equal(rebuilt_bf16(part, r0, n, "avx512"),
                                           rebuilt_bf16(part, r0, n, "portable"))


@needs_extension
def test_bf16_model_prefill_matches_the_reference_forward():
    """A BinaryLinear held in bf16 (batch × prompt inputs) against its dequantizing forward."""
    from packed_codes import binary_codes

    codes = binary_codes(rows=67, cols=515, block=128, orders=(2, 2, 1, 1), n_salient=2,
                         mean=False, beta=True, seed=4)
    layer_ = BinaryLinear.from_codes(codes).to(torch.bfloat16)
    x = inputs(2 * 40, 515).bfloat16()
    y = layer_(x.reshape(2, 40, 515))
    set_kernels(torch.nn.Sequential(layer_), False)
    ref = layer_(x.reshape(2, 40, 515))
    assert y.shape == ref.shape == (2, 40, 67) and y.dtype == ref.dtype == torch.bfloat16
    check_bf16(y.reshape(80, 67), x, layer_.weight_for(torch.float32))
    assert (y == ref).float().mean() >= 0.9


# -- decode: the layer's bound decoder (one form_gemv call) against the registry's path ------
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
    monkeypatch.setattr(cpu, "extension", lambda: cpu.ExtensionStatus(False, "no compiler here"))
    assert form_decoder(form, x) is backends.declines
    layer_ = BinaryLinear.from_codes(codes)
    for _ in range(2):
        check(layer_(x), x, codes.dequantize())
    assert layer_._decode is backends.declines
    cpu._warn_once.cache_clear()


# -- 8-bit uniform codes read in place (a q8 table as the output layer) ----------------------
def uniform8(rows, cols, groupsize, scale_dtype, seed=0):
    """Random 8-bit UniformCodes and their packed tensors (q, scale, zero)."""
    from binllm.methods.codes import UniformCodes
    from binllm.packed.layout import pack

    g = torch.Generator().manual_seed(seed)
    ng = -(-cols // groupsize)
    codes = UniformCodes(q=torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8),
                         scale=(torch.rand(rows, ng, generator=g) + 0.01).half().float(),
                         zero=torch.randint(0, 256, (rows, ng), generator=g).float(),
                         bits=8, groupsize=groupsize, scale_dtype=scale_dtype)
    return codes, pack(codes)[1]


@needs_extension
@pytest.mark.parametrize("impl", list(cpu.IMPLS))
def test_uniform8_in_place_equals_the_dequantized_product(impl):
    """Odd shapes, ragged last groups, fp16 and fp32 scales, 1 to 2 passes of inputs, every x
    dtype: y = x Ŵᵀ to fp32 round-off, rounded once to x's dtype; 3-D x keeps its shape."""
    for rows, cols, gs, sd in ((1, 8, 8, "float16"), (37, 75, 32, "float16"),
                               (19, 200, 7, "float32")):
        codes, t = uniform8(rows, cols, gs, sd)
        Q = codes.dequantize()
        for N in (1, 3, 8 + 5):
            x = inputs(N, cols)
            y = cpu.uniform8_linear(t["q"], t["scale"], t["zero"], gs, x, impl)
            assert y.dtype == torch.float32 and y.shape == (N, rows)
            check(y, x, Q)
            for dtype in (torch.bfloat16, torch.float16):
                yd = cpu.uniform8_linear(t["q"], t["scale"], t["zero"], gs, x.to(dtype), impl)
                ref = cpu.uniform8_linear(t["q"], t["scale"], t["zero"], gs,
                                          x.to(dtype).float(), impl)
                assert yd.dtype == dtype and torch.equal(yd, ref.to(dtype))
        x3 = inputs(2, cols).reshape(1, 2, cols)
        y3 = cpu.uniform8_linear(t["q"], t["scale"], t["zero"], gs, x3, impl)
        assert y3.shape == (1, 2, rows)
        check(y3.reshape(2, rows), x3.reshape(2, cols), Q)


@needs_extension
@pytest.mark.parametrize("impl", list(cpu.IMPLS))
def test_uniform8_rebuild_is_the_dequantized_table_in_bf16(impl):
    """Rows rebuilt in bf16 are UniformCodes.dequantize().to(torch.bfloat16) bit for bit: odd
    widths, ragged groups, fp16/fp32 scales, row ranges, a column slice of a wider buffer; and
    the bf16 prompt path is F.linear of that weight."""
    for rows, cols, gs, sd in ((1, 8, 8, "float16"), (37, 75, 32, "float16"),
                               (19, 200, 7, "float32")):
        codes, t = uniform8(rows, cols, gs, sd)
        ref = codes.dequantize().to(torch.bfloat16)
        for r0, n in ((0, rows), (rows // 3, rows - rows // 3)):
            buf = torch.full((n, cols + 5), 3.0, dtype=torch.bfloat16)
            torch.ops.binllm_cpu.uniform8_dense_bf16(t["q"], t["scale"], t["zero"], gs, r0,
                                                     buf[:, 2:2 + cols], cpu.IMPLS[impl])
            assert torch.equal(buf[:, 2:2 + cols], ref[r0:r0 + n])
            assert bool((buf[:, :2] == 3).all() and (buf[:, 2 + cols:] == 3).all())
        x = inputs(40, cols).bfloat16().reshape(2, 20, cols)
        y = cpu.uniform8_linear_bf16(t["q"], t["scale"], t["zero"], gs, x, impl)
        assert y.shape == (2, 20, rows)
        check_bf16(y.reshape(40, rows), x.reshape(40, cols), codes.dequantize())
        assert cpu.uniform8_linear_bf16(t["q"], t["scale"], t["zero"], gs, x.float()) is None


@needs_extension
def test_uniform8_declines_gradients_and_the_tied_head_reads_the_table_in_place():
    """Gradients wanted: None (the form's path). A q8 TiedHead at decode computes through the
    in-place kernel, never building the table's kernel form; a q4 table keeps the form."""
    from conftest import tiny_causal_lm

    from binllm.engine.outside import quantize_outside, rtn_uniform
    from binllm.packed.embedding import DENSE_TOKENS

    codes, t = uniform8(5, 40, 32, "float16")
    x = inputs(1, 40).requires_grad_()
    assert cpu.uniform8_linear(t["q"], t["scale"], t["zero"], 32, x) is None
    for bits in (8, 4):
        model = tiny_causal_lm("llama", num_hidden_layers=1, tie_word_embeddings=True)
        E = model.model.embed_tokens.weight.detach().clone()
        quantize_outside(model, f"q{bits}", f"q{bits}")
        head, Eq = model.lm_head, rtn_uniform(E, bits).dequantize()
        x = inputs(DENSE_TOKENS - 1, E.shape[1]).reshape(1, -1, E.shape[1])
        with torch.no_grad():
            y = head(x)
        check(y.reshape(-1, E.shape[0]), x.reshape(-1, E.shape[1]), Eq)
        assert (head.table._form is None) == (bits == 8)
        prompt = inputs(DENSE_TOKENS + 3, E.shape[1]).bfloat16()  # a bf16 prompt
        with torch.no_grad():
            y = head(prompt)
            if bits == 8:  # rows rebuilt in bf16, never the whole fp32 table
                head.table.dequantize = None
                assert torch.equal(head(prompt), y)
                del head.table.dequantize
        check_bf16(y, prompt, Eq)
        assert torch.equal(head(prompt.float()), F.linear(prompt.float(), Eq))
