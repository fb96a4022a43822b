"""TrainableCodes: the codes' own dequantize() of trainable fields, rounded back exactly."""

from __future__ import annotations

import pytest
import torch
from test_cpu_kernels import check, inputs, needs_extension
from test_kernel_form import assert_product_close, layer

from binllm.engine.reconstruct import reconstruct
from binllm.kernels import cpu
from binllm.kernels.form import kernel_form
from binllm.methods import METHODS, get_method
from binllm.methods.trainable import TrainableCodes, sign_ste


def stored_codes(name: str, rows: int = 24, cols: int = 200, block: int = 128):
    W, H = layer(rows, cols)
    method = get_method(name)
    return W, method.store(reconstruct(W, H, method, block_size=block).codes)


def trained(codes, W, steps: int = 5):
    """A few Adam steps of ‖Ŵ − target‖² towards a perturbed W: scales and signs move."""
    t = TrainableCodes(codes, W)
    opt = torch.optim.Adam(t.param_groups(lr=0.05, sign_lr=0.3))
    target = W + 0.3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = (t.weight() - target).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return t


@pytest.mark.parametrize("name", list(METHODS))
def test_untrained_fields_give_the_codes_weights_and_round_back_to_the_same_codes(name):
    W, codes = stored_codes(name)
    t = TrainableCodes(codes, W)
    assert torch.equal(t.weight().detach(), codes.dequantize())
    back = t.codes()
    assert torch.equal(back.dequantize(), codes.dequantize())
    assert t.flipped() == 0


@pytest.mark.parametrize("name", list(METHODS))
def test_trained_codes_keep_layout_and_bits_and_are_at_storage_precision(name):
    W, codes = stored_codes(name)
    t = trained(codes, W)
    new = t.codes()
    assert type(new) is type(codes)
    assert new.stored_bits() == codes.stored_bits()
    assert new.paper_bits() == codes.paper_bits()
    assert not torch.equal(new.dequantize(), codes.dequantize())  # training moved something
    for f in type(codes).SCALE_FIELDS:
        x = getattr(new, f)
        if x is not None and codes.scale_dtype == "float16" and not getattr(new, "q8_rows", 0):
            assert torch.equal(x, x.half().float()), f  # exactly representable in fp16
    for f in ("group", "salient", "q", "q_high", "salient_cols"):  # the layout is fixed
        if hasattr(codes, f):
            assert torch.equal(getattr(new, f), getattr(codes, f)), f
    # the model computes with Ŵ of the rounded codes: their weight equals their dequantize
    assert torch.equal(TrainableCodes(new, W).weight().detach(), new.dequantize())


def test_signs_flip_through_the_straight_through_estimator():
    W, codes = stored_codes("rtn-sign")
    t = trained(codes, W, steps=20)
    assert t.flipped() > 0
    assert torch.equal(t.codes().signs, t.latent["signs"].detach() > 0)


@pytest.mark.parametrize("name", ["rtn-sign", "binary-factor"])
def test_latent_signs_step_by_sign_lr_times_the_codes_sign_step(name):
    W, codes = stored_codes(name)
    t = TrainableCodes(codes, W)
    groups = t.param_groups(lr=0.05, sign_lr=0.3)
    latent = [g for g in groups if any(p is x for p in g["params"] for x in t.latent.values())]
    step = getattr(type(codes), "SIGN_STEP", 1.0)
    assert step == (1e-2 if name == "binary-factor" else 1.0)
    assert len(latent) == len(t.latent) > 0
    assert all(g["lr"] == pytest.approx(0.3 * step) for g in latent)


def test_sign_ste_passes_the_gradient_where_the_latent_weight_is_small():
    x = torch.tensor([-2.0, -0.5, 0.25, 3.0], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("name", list(METHODS))
def test_kernel_form_of_refined_codes_equals_their_dequantize(name):
    W, codes = stored_codes(name, rows=11, cols=200)
    new = trained(codes, W).codes()
    assert_product_close(kernel_form(new), new.dequantize())


@needs_extension
@pytest.mark.parametrize("name", list(METHODS))
def test_cpu_kernels_on_refined_codes_equal_their_dequantize(name):
    W, codes = stored_codes(name, rows=37, cols=300)
    new = trained(codes, W).codes()
    form, Q = kernel_form(new), new.dequantize()
    for N in (1, 5, cpu.GEMV_MAX + 8):
        x = inputs(N, 300)
        check(cpu.form_matmul(form, x), x, Q)
