"""The int8 prefill (binllm.kernels.cpu_int8): its int8 rows against torch's ops, its product
against the same arithmetic done naively and against the exact product, and the option's
plumbing (layers, `binllm eval --prefill int8`)."""

from __future__ import annotations

import pytest
import torch
from packed_codes import HAND_BUILT
from test_cpu_kernels import needs_extension
from test_kernel_form import layer

from binllm.engine.reconstruct import reconstruct
from binllm.kernels import cpu, cpu_int8
from binllm.kernels.form import kernel_form
from binllm.kernels.form_ref import stages_of
from binllm.methods import METHODS, get_method
from binllm.packed.layers import BinaryLinear, set_int8_prefill

pytestmark = needs_extension


def naive_rows(src: torch.Tensor, colscale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows of v = src · colscale in plain torch: scale = max |row| / 127,
    q = round(row · 127 / max)."""
    v = src.float() if colscale is None else src.float() * colscale
    m = v.abs().amax(1)
    # 127 / m divided (a scalar over a tensor would be m's reciprocal times 127: other bits)
    inv = torch.where(m > 0, torch.full_like(m, 127.0) / m, torch.zeros_like(m))
    return torch.round(v * inv[:, None]).to(torch.int8), m / 127


def prompt(N, cols, seed=3):
    x = torch.randn(N, cols, generator=torch.Generator().manual_seed(seed))
    x[:, 0] *= 20  # an outlier channel, as LLM activations have
    return x


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("K", [1, 15, 16, 77, 300])
def test_int8_rows_are_torchs_rounding_of_each_row_to_its_own_scale(K, seed):
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randn(9, K + 5, generator=g) * torch.logspace(-3, 3, 9)[:, None]).bfloat16()
    wide[4] = 0  # a row of zeros: scale 0, q 0
    src = wide[:, 2:2 + K]  # a column slice: row stride > K
    colscale = torch.rand(K, generator=g) * 4 + 0.1
    for cs in (None, colscale):
        q, scale = cpu_int8.quantize_rows(src, cs)
        nq, nscale = naive_rows(src, cs)
        assert torch.equal(q, nq) and torch.equal(scale, nscale)
        assert int(q.abs().max()) == 127 and not q[4].any() and scale[4] == 0


def test_scaling_back_is_acc_times_sx_times_sw_in_that_order():
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-2**20, 2**20, (37, 21), generator=g, dtype=torch.int32)
    sx, sw = torch.rand(37, generator=g), torch.rand(21, generator=g)
    y = torch.full((37, 30), 7.0)
    torch.ops.binllm_cpu.scale_int32(acc, sx, sw, y[:, 4:25])
    assert torch.equal(y[:, 4:25], acc.float() * sx[:, None] * sw[None])
    assert (y[:, :4] == 7).all() and (y[:, 25:] == 7).all()  # only its columns written
    yb = torch.full((37, 30), 7.0, dtype=torch.bfloat16)  # bf16: torch's rounding of the same
    torch.ops.binllm_cpu.scale_int32(acc, sx, sw, yb[:, 4:25])
    assert torch.equal(yb[:, 4:25], (acc.float() * sx[:, None] * sw[None]).bfloat16())
    assert (yb[:, :4] == 7).all() and (yb[:, 25:] == 7).all()
    # ties (257 and 259 lie halfway between bf16 neighbours: to the even one) and infinities
    acc = torch.tensor([[257, 259, -257, 3, -5]], dtype=torch.int32)
    sx, sw = torch.ones(1), torch.tensor([1.0, 1.0, 1.0, float("inf"), float("inf")])
    yb = torch.empty(1, 5, dtype=torch.bfloat16)
    torch.ops.binllm_cpu.scale_int32(acc, sx, sw, yb)
    assert yb.tolist() == [[256.0, 260.0, -256.0, float("inf"), float("-inf")]]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N,K", [(1, 1), (5, 15), (33, 16), (64, 77), (300, 170)])
def test_smoothing_is_the_root_of_each_columns_largest_magnitude(N, K, threads):
    g = torch.Generator().manual_seed(N + K)
    wide = (torch.randn(N, K + 3, generator=g) * torch.logspace(-2, 2, K + 3)).bfloat16()
    xs = wide[:, 1:1 + K]  # a column slice: row stride > K
    xs[:, K // 2] = 0  # a column of zeros (padding): c = 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        c = cpu_int8.smoothing(xs)
    finally:
        torch.set_num_threads(before)
    m = xs.float().abs().amax(0)  # √ correctly rounded (fp64's, rounded once to fp32; torch's
    root = m.double().sqrt().float()  # vectorised fp32 sqrt can be one unit in the last place off)
    assert torch.equal(c, torch.where(m > 0, root, torch.ones_like(m)))


@pytest.mark.parametrize("name", ["q1_0", "rtn-sign"])
def test_in_order_forms_give_the_naive_int8_product_of_the_bf16_weight(name):
    """One part over x's columns in order (cols a multiple of 8): the rebuilt rows are
    Ŵ.to(bf16) exactly, so the whole product is the naive int8 arithmetic bit for bit."""
    W, H = layer(40, 256)
    codes = reconstruct(W, H, get_method(name), block_size=128).codes
    form = kernel_form(codes)
    x = prompt(45, 256).bfloat16()
    c = x.float().abs().amax(0).double().sqrt().float()  # smoothing (no zero column here)
    wq, sw = naive_rows(codes.dequantize().bfloat16(), c)
    xq, sx = naive_rows(x, torch.reciprocal(c))
    ref = (xq.long() @ wq.long().T).float() * sx[:, None] * sw[None]
    assert torch.equal(cpu_int8.form_matmul_int8(form, x), ref)
    assert torch.equal(cpu_int8.int8_linear(form, x), ref.bfloat16())  # rounded once to x's


def check_within_rounding(form, x, Q):
    """|y − x Ŵᵀ| within what the two roundings allow, entry by entry: with the smoothing c,
    each x value moves by at most c_j times half its token's step s_x (after bf16, 2⁻⁹
    relative), each rebuilt weight by half its row's step s_w over c_j (after bf16); so
    |err| ≤ Σ_j |x_j| δw_j + |w_j| δx_j + δx_j δw_j."""
    y = cpu_int8.int8_linear(form, x)
    if len(stages_of(form)) > 1:  # a chain rounds t again between its stages: within 5 %
        ref = x.double() @ Q.double().T
        assert float((y.double() - ref).norm() / ref.norm()) < 0.05
        return
    xs = cpu.columns_bf16(form, x.bfloat16())
    c = cpu_int8.smoothing(xs)  # (K,) in the parts' column order
    sw = torch.zeros(form.rows)
    for r0, w in cpu.rows_bf16(form):  # the rows the kernel rounds, padding columns included
        sw[r0:r0 + w.shape[0]] = (w.float() * c).abs().amax(1) / 127
    sx = (xs.float() / c).abs().amax(1) / 127
    perm = torch.cat([part.perm for part in form.parts])
    cx = torch.ones(form.cols)  # c of each of x's columns (each is in one part here)
    cx[perm[perm >= 0]] = c[perm >= 0]
    dx = sx[:, None] * cx / 2 + x.abs() * 2**-8  # (N, cols)
    dw = sw[:, None] / cx / 2 + Q.abs() * 2**-8  # (rows, cols)
    bound = x.abs() @ dw.T + dx @ Q.abs().T + dx @ dw.T
    err = (y - x @ Q.T).abs()
    assert (err <= bound * 1.001 + 1e-5).all(), float((err / bound).max())


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_is_within_the_roundings_of_the_exact_product(name):
    """Odd shapes, columns gathered and padded, chains (binary-factor), PB-LLM's salient levels."""
    for rows, cols in [(37, 300), (11, 200)]:
        W, H = layer(rows, cols)
        codes = reconstruct(W, H, get_method(name), block_size=128).codes
        check_within_rounding(kernel_form(codes), prompt(cpu.GEMV_MAX + 9, cols),
                              codes.dequantize())


@pytest.mark.parametrize("name", list(METHODS))
def test_a_bf16_prompt_gets_the_fp32_product_rounded_once_to_bf16(name):
    """The last stage writes bf16 itself (a chain's earlier stages stay fp32): the same bits as
    computing the bf16 prompt's product in fp32 and converting it."""
    W, H = layer(37, 300)
    form = kernel_form(reconstruct(W, H, get_method(name), block_size=128).codes)
    x = prompt(cpu.GEMV_MAX + 9, 300).bfloat16()
    y = cpu_int8.int8_linear(form, x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, cpu_int8.int8_linear(form, x.float()).bfloat16())


@pytest.mark.parametrize("kind", list(HAND_BUILT))
def test_hand_built_codes_are_within_the_roundings_of_the_exact_product(kind):
    codes = HAND_BUILT[kind]()
    check_within_rounding(kernel_form(codes), prompt(cpu.GEMV_MAX + 1, codes.shape[1]),
                          codes.dequantize())


def test_decode_batches_gradients_and_other_devices_are_left_to_the_exact_path():
    W, H = layer(16, 64)
    form = kernel_form(reconstruct(W, H, get_method("q1_0"), block_size=64).codes)
    assert cpu_int8.int8_linear(form, prompt(cpu.GEMV_MAX, 64)) is None
    assert cpu_int8.int8_linear(form, prompt(cpu.GEMV_MAX + 1, 64).requires_grad_()) is None
    assert cpu_int8.int8_linear(form, prompt(cpu.GEMV_MAX + 1, 64).to("meta")) is None


def test_a_layer_takes_the_int8_prefill_only_for_prompts_and_only_when_asked():
    W, H = layer(24, 96)
    codes = reconstruct(W, H, get_method("arb-llm-rc"), block_size=32).codes
    lin = BinaryLinear.from_codes(codes, bias=torch.randn(24))
    model = torch.nn.Sequential(lin)
    x = prompt(2 * cpu.GEMV_MAX, 96).reshape(2, cpu.GEMV_MAX, 96)  # (batch, tokens, cols)
    step = prompt(3, 96)
    with torch.no_grad():
        exact, exact_step = model(x), model(step)
        form = lin.kernel_form()
        assert set_int8_prefill(model) == 1
        assert lin.kernel_form() is form  # kept: nothing derived again
        y, y_step = model(x), model(step)
        assert not torch.equal(y, exact) and torch.equal(y_step, exact_step)  # decode: exact
        ref = x.reshape(-1, 96) @ codes.dequantize().T + lin.bias
        assert float((y.reshape(-1, 24) - ref).norm() / ref.norm()) < 0.05
        set_int8_prefill(model, False)
        assert torch.equal(model(x), exact)


def test_it_runs_only_on_torch_2_6_and_a_cpu_with_vnni_or_amx_int8():
    vnni = "flags : fpu sse2 avx512f avx512_vnni"
    assert "older than 2.6" in cpu_int8.unavailable(vnni, version="2.5.1")
    assert "no VNNI" in cpu_int8.unavailable("flags : fpu sse2 avx2", version="2.13.0")
    assert cpu_int8.unavailable("flags : fpu amx_int8", version="2.13.0") is None
    assert cpu_int8.unavailable(vnni, version="2.13.0") is None

