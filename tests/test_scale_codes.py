"""Cheaper metadata: 8-bit α/μ codes with fp16 super-scales (scale_codes=q8) and the `block`
option of the BiLLM / ARB families — rounding against a naive oracle, the loop computing with
the stored values, the accounting, exact packing, and a saved directory that loads."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from binllm.engine.reconstruct import reconstruct
from binllm.methods import get_method
from binllm.methods.codes import q8_round, q8_split, q8_values
from binllm.packed.layout import pack, unpack
from binllm.packed.packing import PackingError


def _layer(rows=70, cols=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * (torch.rand(rows, 1, generator=g) + 0.2)
    X = torch.randn(400, cols, generator=g) @ (torch.eye(cols) + 0.1 * torch.randn(
        cols, cols, generator=g))
    return W, 2 / 400 * X.T @ X


def test_q8_round_matches_a_naive_super_block_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, 4, generator=g) * torch.logspace(-3, 0, 70)[:, None]
    x[1, 20:40] = 0  # a super-block of zeros
    rows = 20
    got = q8_round(x, rows)
    want = torch.empty_like(x)
    for a in range(3):
        for b in range(4):
            for r0 in range(0, 70, rows):
                v = x[a, r0:r0 + rows, b]
                d = v.abs().max().to(torch.float16).float()
                for i, xi in enumerate(v):
                    if d == 0:
                        q = 0.0
                    elif xi.abs() == v.abs().max():
                        q = 127.0 if xi >= 0 else -127.0
                    else:
                        q = float(min(127, max(-127, round(float(xi) * 127 / float(d)))))
                    want[a, r0 + i, b] = (d * q) / 127
                    assert abs(want[a, r0 + i, b] - xi) <= d / 127  # within one step
    assert torch.equal(got, want)
    assert (got[1, 20:40] == 0).all()
    q, d = q8_split(got, rows)  # recovered from the values alone
    assert q.dtype == torch.int8 and d.dtype == torch.float16 and d.shape == (3, 4, 4)
    assert torch.equal(q8_values(q, d, rows), got)


@pytest.mark.parametrize("name,extra", [("billm", {}), ("arb-llm-rc", {}),
                                        ("arb-llm-x", {"superblock_rows": "32"})])
def test_q8_codes_are_what_the_loop_computed_with_and_pack_exactly(name, extra):
    W, H = _layer()
    rec = reconstruct(W, H, get_method(name, {"scale_codes": "q8", **extra}))
    c = rec.codes
    assert c.q8_rows == int(extra.get("superblock_rows", 256))
    assert torch.equal(c.dequantize(), rec.Q)  # Ŵ and the feedback used the 8-bit values
    for table in (c.alpha, c.mu):
        if table is not None:
            q, d = q8_split(table, c.q8_rows)
            assert torch.equal(q8_values(q, d, c.q8_rows), table)
    layout, tensors = pack(c)
    assert {"alpha_q", "alpha_d"} <= set(tensors) and "alpha" not in tensors
    assert sum(t.numel() * t.element_size() * 8 for t in tensors.values()) == c.stored_bits()
    back = unpack(layout, tensors)
    assert back.q8_rows == c.q8_rows and torch.equal(back.dequantize(), rec.Q)


def test_q8_accounting_against_the_float_layout():
    """Same groups and signs, α/μ as codes: each stored table of 16-bit (rows, nblk) floats
    becomes 8-bit codes plus ⌈rows / 256⌉ fp16 super-scales per block."""
    W, H = _layer(rows=300)
    fl = reconstruct(W, H, get_method("billm")).codes
    q8 = replace(fl, alpha=q8_round(fl.alpha, 256), mu=q8_round(fl.mu, 256), q8_rows=256)
    rows, nblk = 300, 2
    tables = sum(fl.orders) + len(fl.orders)  # α of every (group, order) pair, μ per group
    per_float = rows * nblk * 16
    per_q8 = rows * nblk * 8 + 2 * nblk * 16  # ⌈300 / 256⌉ = 2 super-scales per block
    assert fl.stored_bits() - q8.stored_bits() == tables * (per_float - per_q8)
    _, tensors = pack(q8)
    assert sum(t.numel() * t.element_size() * 8 for t in tensors.values()) == q8.stored_bits()


def test_packing_refuses_values_that_are_not_q8_codes():
    W, H = _layer()
    c = reconstruct(W, H, get_method("billm", {"scale_codes": "q8"})).codes
    bad = replace(c, alpha=c.alpha * 1.001)
    with pytest.raises(PackingError, match="not 8-bit codes"):
        pack(bad)


def test_block_option_sets_the_scale_and_feedback_block():
    W, H = _layer(cols=512)
    default = reconstruct(W, H, get_method("arb-rc")).codes
    wide = reconstruct(W, H, get_method("arb-rc", {"block": "256"})).codes
    assert (default.block_size, default.alpha.shape[-1]) == (128, 4)
    assert (wide.block_size, wide.alpha.shape[-1]) == (256, 2)
    same = reconstruct(W, H, get_method("arb-rc", {"block": "256"}), block_size=256).codes
    assert torch.equal(same.dequantize(), wide.dequantize())  # = the run's --block-size 256
    with pytest.raises(Exception, match="block=-1"):
        get_method("billm", {"block": "-1"})
    with pytest.raises(Exception, match="superblock_rows=0"):
        get_method("billm", {"superblock_rows": "0"})


def test_a_saved_q8_model_loads_with_the_calibrated_logits(tmp_path):
    from conftest import tiny_causal_lm

    import binllm
    from binllm import QuantizeConfig, binarize_model

    model = tiny_causal_lm()
    calib = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))]
    report = binarize_model(model, QuantizeConfig("arb-llm-rc", {"scale_codes": "q8"}), calib)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    binllm.save_binarized(model, report, None, tmp_path / "m")
    with torch.no_grad():
        exact = binllm.load(tmp_path / "m", kernels=False)(ids).logits  # dequantize path
        fast = binllm.load(tmp_path / "m")(ids).logits  # the kernel form of the same codes
    assert torch.equal(exact, want)
    torch.testing.assert_close(fast, want, rtol=1e-4, atol=1e-5)


def test_block_sign_q8_codes_and_the_consumers_that_need_fp16_scales():
    """q1_0 with scale_codes=q8: the B-steps use the 8-bit α; the Triton kernel and the GGUF
    Q1_0 export (both read fp16 α) decline the layout instead of misreading it."""
    from binllm.export.gguf_export import q1_0_problem

    W, H = _layer(cols=256)
    rec = reconstruct(W, H, get_method("q1_0", {"scale_codes": "q8"}))
    c = rec.codes
    assert c.q8_rows == 256 and torch.equal(c.dequantize(), rec.Q)
    q, d = q8_split(c.alpha, 256)
    assert torch.equal(q8_values(q, d, 256), c.alpha)
    layout, tensors = pack(c)
    assert sum(t.numel() * t.element_size() * 8 for t in tensors.values()) == c.stored_bits()
    assert c.stored_bits() == 70 * 256 + 70 * 2 * 8 + 2 * 16  # signs, α codes, super-scales
    assert torch.equal(unpack(layout, tensors).dequantize(), rec.Q)
    assert "8-bit scale codes" in q1_0_problem(layout)
    plain, _ = pack(reconstruct(W, H, get_method("q1_0")).codes)
    assert q1_0_problem(plain) is None
    pytest.importorskip("triton")
    from binllm.kernels.triton_sign import supports

    assert not supports(layout) and supports(plain)
