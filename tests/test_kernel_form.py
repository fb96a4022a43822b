"""Kernel form (binllm.kernels.form): form · x equals codes.dequantize() · x to fp32 round-off."""

from __future__ import annotations

import pytest
import torch
from packed_codes import HAND_BUILT, uniform_codes

from binllm.kernels.form import form_dense, form_matmul_torch, kernel_form
from binllm.kernels.form_ref import plane_rows
from binllm.packed.packing import unpack_bits
from binllm.methods import METHODS, get_method
from binllm.engine.reconstruct import reconstruct

# (rows, cols, block): a single row, columns not a multiple of 8, 16 or 128, several blocks
SHAPES = [(1, 37, 16), (9, 77, 32), (6, 200, 128)]


def layer(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * cols, cols, generator=g)
    X[:, 0] *= 20  # an outlier input channel, as LLM activations have
    return torch.randn(rows, cols, generator=g), 2 * X.T @ X / X.shape[0]


def assert_product_close(form, W, N=3, seed=1):
    """form · x against the dequantized W · x, with fp32 round-off scaled by |W| · |x|."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, W.shape[1], generator=g)
    x[:, 0] *= 20
    y = form_matmul_torch(form, x)
    ref = x.double() @ W.double().T
    bound = 1e-5 * (x.abs().double() @ W.abs().double().T) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all(), float(((y - ref) / bound).abs().max())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(METHODS))
def test_form_reproduces_the_dequantized_product_for_every_method(name, shape):
    rows, cols, block = shape
    W, H = layer(rows, cols)
    codes = reconstruct(W, H, get_method(name), block_size=block).codes
    Q = codes.dequantize()
    form = kernel_form(codes)
    assert torch.allclose(form_dense(form), Q, rtol=0, atol=1e-6 * float(Q.abs().max()))
    assert_product_close(form, Q)


@pytest.mark.parametrize("kind", list(HAND_BUILT))
def test_form_of_hand_built_codes(kind):
    codes = HAND_BUILT[kind]()
    Q = codes.dequantize()
    form = kernel_form(codes)
    assert torch.allclose(form_dense(form), Q, rtol=0, atol=1e-6 * float(Q.abs().max()))
    assert_product_close(form, Q, N=2)


def test_form_layout_billm_planes_and_permutation():
    """BiLLM: salient columns gathered per block (2 sign planes), the rest 2 stored planes
    (sign, group bit) and a term on their AND; segments are whole bytes, padding is −1; the
    planes are 16-row tiles whose rows read back as the packed signs."""
    codes = HAND_BUILT["billm-like"]()  # 5 x 77, blocks of 32, orders (2, 1, 1)
    form = kernel_form(codes)
    sal, rest = form.parts
    assert sal.planes.shape[1] == 2 and rest.planes.shape[1] == 2
    assert sal.planes.shape[0] == 1 and sal.planes.shape[3] == 16  # 5 rows: one padded tile
    assert ((rest.terms[:, 0] >= 0) & (rest.terms[:, 1] >= 0)).sum() == 1  # I ∧ s, not stored
    assert rest.scale is None and sal.scale is None
    for part, cls in ((sal, codes.salient_cols), (rest, ~codes.salient_cols)):
        real = part.perm[part.perm >= 0]
        assert torch.equal(real, torch.nonzero(cls).flatten())  # block order, then column order
        assert part.width % 8 == 0 and int(part.seg[-1]) * 8 == part.width
        assert not part.planes[:, :, :, 5:].any()  # padding rows
    s0 = sal.terms[(sal.terms[:, 0] >= 0) & (sal.terms[:, 1] < 0)][0, 0]
    got = unpack_bits(plane_rows(sal.planes, int(s0), slice(None), 5), sal.width)
    idx = sal.perm.clamp(min=0)
    assert torch.equal(got[:, sal.perm >= 0], codes.signs[0][:, idx][:, sal.perm >= 0])


def test_form_records_whether_a_part_reads_x_in_order():
    """q1_0 (one part over x's columns in order) is in order, padded past x's width too (its
    −1 tail reads nothing); BiLLM's parts (columns gathered by class, padded) are not."""
    W, H = layer(9, 256)
    (part,) = kernel_form(reconstruct(W, H, get_method("q1_0"), block_size=128).codes).parts
    assert part.in_order and torch.equal(part.perm, torch.arange(256))
    W, H = layer(9, 77)
    (part,) = kernel_form(reconstruct(W, H, get_method("q1_0"), block_size=128).codes).parts
    assert part.in_order and part.width > 77 and bool((part.perm[77:] < 0).all())
    for part in kernel_form(HAND_BUILT["billm-like"]()).parts:
        assert not part.in_order and not torch.equal(part.perm, torch.arange(part.width))
    W, H = layer(11, 200)  # binary-factor: rank 1, so stage 2 reads 1 input padded to 8
    chain = kernel_form(reconstruct(W, H, get_method("binary-factor"), block_size=128).codes)
    (s_in,), (s_out,) = (stage.parts for stage in chain.stages)
    assert s_in.in_order and s_out.in_order and s_out.width == 8 > chain.stages[1].cols


def test_form_shares_coefficients_that_are_exact_multiples():
    """ARB-RC: −α, 2α, α, −2α of one (group, order) are one stored array with factors; GPTQ's
    2^k·s likewise; zero coefficients (no mean) leave no term."""
    rc = kernel_form(HAND_BUILT["rc-like"]())
    for part in rc.parts:
        assert part.coef.shape[0] < part.terms.shape[0]
        assert set(part.fac.abs().tolist()) <= {1.0, 2.0}
    (g,) = kernel_form(uniform_codes(bits=3)).parts
    assert g.coef.shape[0] == 2 and sorted(g.fac.abs().tolist()) == [1.0, 1.0, 2.0, 4.0]


def test_form_rc_folds_column_scales_into_x_versions():
    codes = HAND_BUILT["rc-like"]()
    form = kernel_form(codes)
    assert all(p.scale is not None and p.scale.shape[0] >= 2 for p in form.parts)


def test_form_partial_binary_is_one_plane_plus_a_sparse_part():
    codes = HAND_BUILT["pb-8bit"]()
    form = kernel_form(codes)
    (part,) = form.parts
    assert part.planes.shape[1] == 1
    assert form.sparse.q.dtype == torch.uint8
    assert form.sparse.col.numel() == int(codes.salient.sum())


def test_form_moves_between_devices():
    form = kernel_form(HAND_BUILT["rc-cgb-like"]()).to("meta")
    assert all(p.planes.is_meta and p.scale.is_meta for p in form.parts)


def test_unknown_codes_have_no_form():
    with pytest.raises(TypeError, match="no kernel form"):
        kernel_form(object())
