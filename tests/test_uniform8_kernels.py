"""8-bit UniformCodes read in place by the compiled CPU kernels (a q8 table as the output
layer): the GEMV and the bf16 row rebuild against the dequantized table, what they decline,
and the q8 TiedHead computing through them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_cpu_kernels import check, check_bf16, inputs, needs_extension

from binllm.kernels import cpu


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
def test_uniform8_one_input_over_whole_groups_equals_the_dequantized_product(impl):
    """One input over whole 16-, 32-, 64- and 128-column groups (the AVX-512 loop's unrolled
    steps, its zero points folded out, four rows at a time and the rest one at a time), fp16
    and fp32 scales, fp32 and bf16 x: y = x Ŵᵀ to fp32 round-off."""
    for rows, cols, gs, sd in ((7, 48, 16, "float16"), (11, 576, 32, "float16"),
                               (9, 96, 32, "float32"), (6, 192, 64, "float32"),
                               (5, 384, 128, "float16")):
        codes, t = uniform8(rows, cols, gs, sd)
        Q = codes.dequantize()
        for x in (inputs(1, cols), inputs(1, cols).bfloat16().float()):
            y = cpu.uniform8_linear(t["q"], t["scale"], t["zero"], gs, x, impl)
            assert y.shape == (1, rows)
            check(y, x, Q)


@needs_extension
@pytest.mark.parametrize("gemm", ["bf16", "fp32"])
@pytest.mark.parametrize("impl", list(cpu.IMPLS))
def test_uniform8_rebuild_is_the_dequantized_table_in_bf16(impl, gemm, monkeypatch):
    """Rows rebuilt in bf16 are UniformCodes.dequantize().to(torch.bfloat16) bit for bit: odd
    widths, ragged groups, fp16/fp32 scales, row ranges, a column slice of a wider buffer; and
    the bf16 prompt path is F.linear of that weight, by the bf16 GEMM or (a CPU without bf16
    instructions) the fp32 GEMM on the same values."""
    monkeypatch.setattr(cpu, "fast_bf16_matmul", lambda flags=None: gemm == "bf16")
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
def test_uniform8_declines_gradients_and_fp64_and_the_tied_head_reads_the_table_in_place():
    """Gradients wanted or an fp64 x: None (the form's path). A q8 TiedHead at decode computes
    through the in-place kernel, never building the table's kernel form; a q4 table keeps the
    form; an fp64 x through a q8 head falls back to the form and keeps its dtype."""
    from conftest import tiny_causal_lm

    from binllm.engine.outside import quantize_outside, rtn_uniform
    from binllm.packed.embedding import DENSE_TOKENS

    codes, t = uniform8(5, 40, 32, "float16")
    x = inputs(1, 40).requires_grad_()
    assert cpu.uniform8_linear(t["q"], t["scale"], t["zero"], 32, x) is None
    assert cpu.uniform8_linear(t["q"], t["scale"], t["zero"], 32, inputs(1, 40).double()) is None
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
        with torch.no_grad():
            y64 = head(x.double())  # no compiled kernel reads fp64: the form's path
        assert y64.dtype == torch.float64
        check(y64.reshape(-1, E.shape[0]), x.reshape(-1, E.shape[1]), Eq)
        prompt = inputs(DENSE_TOKENS + 3, E.shape[1]).bfloat16()  # a bf16 prompt
        with torch.no_grad():
            y = head(prompt)
            if bits == 8:  # rows rebuilt in bf16, never the whole fp32 table
                head.table.dequantize = None
                assert torch.equal(head(prompt), y)
                del head.table.dequantize
        check_bf16(y, prompt, Eq)
        assert torch.equal(head(prompt.float()), F.linear(prompt.float(), Eq))
