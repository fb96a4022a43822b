"""CPU kernels of the kernel form against the plain dequantized path, and their fallback."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from packed_codes import HAND_BUILT
from test_kernel_form import layer

from binllm.engine.reconstruct import reconstruct
from binllm.kernels import cpu, cpu_build
from binllm.kernels.form import kernel_form
from binllm.kernels.form_ref import stages_of
from binllm.methods import METHODS, get_method
from binllm.packed.layers import BinaryLinear, set_kernels

needs_extension = pytest.mark.skipif(not cpu.extension().ok, reason=cpu.extension().reason)
# decode, small batches, chunked GEMV, prefill (dense rebuild + GEMM)
BATCHES = [1, 2, 5, cpu.SMALL_BATCH, cpu.SMALL_BATCH + 3, cpu.GEMV_MAX + 8]
# (rows, cols, block): one row; a row tile and a partial one, columns not a multiple of 128;
# eight whole row tiles (decode sums four together, the second four's lines fetched while the
# first four compute) and a partial ninth
SHAPES = [(1, 37, 16), (11, 200, 128), (37, 300, 128), (136, 48, 16)]


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


def test_build_key_changes_with_any_source_or_header(tmp_path, monkeypatch):
    """The extension's cache name hashes every source and header: a changed file builds anew,
    the same bytes reuse the build."""
    key = cpu_build.build_key()
    files = (*cpu_build.SOURCES, *cpu_build.HEADERS)
    for path in files:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(cpu_build, "SOURCES", tuple(tmp_path / p.name for p in cpu_build.SOURCES))
    monkeypatch.setattr(cpu_build, "HEADERS", tuple(tmp_path / p.name for p in cpu_build.HEADERS))
    assert cpu_build.build_key() == key
    for path in (*cpu_build.SOURCES, *cpu_build.HEADERS):
        text = path.read_bytes()
        path.write_bytes(text + b"\n")
        assert cpu_build.build_key() != key, path.name
        path.write_bytes(text)
    assert cpu_build.build_key() == key


@needs_extension
def test_a_build_says_so_before_it_starts_and_a_cached_one_says_nothing(tmp_path, monkeypatch,
                                                                        caplog):
    """The first use compiles for about a minute: the log names that wait; a later load from
    the cache is silent. (A fresh TORCH_EXTENSIONS_DIR holds no build; load() is stubbed.)"""
    name = f"binllm_cpu_{cpu_build.build_key()}"
    assert cpu_build.built(name)  # the suite's own build
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not cpu_build.built(name)
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "load", lambda **kw: (_ for _ in ()).throw(OSError("stub")))
    for cached, said in ((False, 1), (True, 0)):
        monkeypatch.setattr(cpu_build, "built", lambda n, c=cached: c)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="binllm.kernels.cpu_build"):
            status = cpu_build.extension.__wrapped__()
        assert not status.ok and "OSError: stub" in status.reason
        assert sum("compiling the CPU kernels" in r.getMessage() for r in caplog.records) == said


def test_fallback_warns_once_and_computes_the_same(monkeypatch, caplog):
    codes = HAND_BUILT["pb-3bit-grouped"]()
    form, Q = kernel_form(codes), codes.dequantize()
    off = cpu_build.ExtensionStatus(False, "no compiler here")
    monkeypatch.setattr(cpu, "extension", lambda: off)
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


@needs_extension
def test_one_token_over_column_passes_with_whole_tiles_and_the_decoders_copy():
    """One input over 25,000 columns × 2 x versions (more than one pass's tables) and 136 rows
    (eight whole tiles and a partial ninth): the bound decoder (tile-major coefficients, no
    lines fetched ahead across passes) equals form_matmul bit for bit and Ŵx to round-off."""
    from packed_codes import binary_codes

    codes = binary_codes(rows=136, cols=25000, block=128, orders=(2, 1), n_salient=1,
                         mean=True, beta=True, seed=6)
    form, Q = kernel_form(codes), codes.dequantize()
    x = inputs(1, 25000)
    y = cpu.form_matmul(form, x)
    check(y, x, Q)
    assert torch.equal(cpu.bind_decoder(form)(x, None), y)


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
@pytest.mark.parametrize("gemm", ["bf16", "fp32"])
@pytest.mark.parametrize("impl", list(cpu.IMPLS))
@pytest.mark.parametrize("name", BF16_METHODS)
def test_bf16_prefill_is_f_linear_of_the_bf16_weight(name, impl, gemm, monkeypatch):
    """Rows rebuilt in bf16 in chunks of 24 (chunks start inside a 16-row tile), odd shapes,
    multiplied by the bf16 GEMM or (a CPU without bf16 instructions) the fp32 GEMM on the same
    bf16 values; the fp32 prefill of the same input stays exact."""
    monkeypatch.setattr(cpu, "fast_bf16_matmul", lambda flags=None: gemm == "bf16")
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


def test_fast_bf16_matmul_reads_the_cpu_flags():
    assert cpu.fast_bf16_matmul("flags : fpu avx512f avx512_bf16")
    assert cpu.fast_bf16_matmul("flags : fpu amx_bf16 amx_tile")
    assert not cpu.fast_bf16_matmul("flags : fpu avx512f avx512_vnni")
    assert cpu.fast_bf16_matmul("aarch64")  # no flag line: the bf16 GEMM, as torch picks


@pytest.mark.skipif(not cpu.extension().avx512,
                    reason="no AVX-512 loops compiled here: both impls run the portable loop")
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



@needs_extension
@pytest.mark.parametrize("impl", list(cpu.IMPLS))
def test_a_padded_in_order_part_reads_only_its_own_columns_of_a_wider_x(impl):
    """A part over x's first 58 columns, padded to 64, with x 64 wide (its last columns
    another part's): the padding reads nothing of x, though the part is as wide as x."""
    W, H = layer(9, 58)
    codes = reconstruct(W, H, get_method("q1_0"), block_size=128).codes
    (part,) = kernel_form(codes).parts
    assert part.in_order and part.width == 64
    x = inputs(3, 64)
    y = torch.zeros(3, 9)
    torch.ops.binllm_cpu.bitpart(x, part.perm, torch.empty(0), part.planes, part.terms,
                                 part.cptr, part.cidx, part.fac, part.coef, part.seg, y,
                                 cpu.IMPLS[impl], True)
    check(y, x[:, :58], codes.dequantize())


@needs_extension
@pytest.mark.skipif(not cpu.extension().avx512, reason="the AVX-512 loops group row tiles")
@pytest.mark.parametrize("name", ["q1_0", "rtn-sign"])
def test_one_token_gets_a_row_tiles_same_bits_alone_or_beside_three_more(name):
    """Codes made row by row, so a 16-row layer's are the first 16 rows of a 72-row layer's:
    one token's product sums rows 0..63 of the 72-row layer four tiles at a time and the
    16-row layer's tile alone; their first 16 outputs are equal bit for bit."""
    W, H = layer(72, 96)
    full = reconstruct(W, H, get_method(name), block_size=32).codes
    alone = reconstruct(W[:16], H, get_method(name), block_size=32).codes
    assert torch.equal(alone.dequantize(), full.dequantize()[:16])
    x = inputs(1, 96)
    y_full = cpu.form_matmul(kernel_form(full), x)
    assert torch.equal(cpu.form_matmul(kernel_form(alone), x), y_full[:, :16])
    check(y_full, x, full.dequantize())
