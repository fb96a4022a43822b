"""binary-factor: Ŵ = diag(s_out) sign(U) sign(V)ᵀ diag(s_in), its codes, format and kernels."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import correlated, one_line_error, run_cli, tiny_llama
from packed_codes import factor_codes
from test_cpu_kernels import BATCHES, check, inputs, needs_extension
from test_refine import FAST, calibration, layer0_error

from binllm.engine.binarize import binarize_model
from binllm.engine.config import ConfigError, QuantizeConfig
from binllm.engine.reconstruct import reconstruct
from binllm.kernels import cpu, form_matmul
from binllm.kernels.form import ChainForm, form_dense, form_matmul_torch, kernel_form
from binllm.methods import MethodArgumentError, get_method
from binllm.methods.binary_factor import (FactorGrid, fit_column, fit_scales, rank_for_bits,
                                          sign_sweep)
from binllm.methods.factor_codes import FactorCodes, factor_bits
from binllm.packed.layers import BinaryLinear
from binllm.packed.layout import pack, unpack


def proxy_loss(W, Q, H) -> float:
    """Σ_i Σ_a Σ_b E_ia H_ab E_ib with E = W − Q, term by term (the naive oracle)."""
    E, H = (W - Q).tolist(), H.tolist()
    n = len(H)
    return sum(e[a] * H[a][b] * e[b] for e in E for a in range(n) for b in range(n))


def codes_of(W, H, bits: float) -> FactorCodes:
    method = get_method("binary-factor", {"bits": bits})
    return method.store(reconstruct(W, H, method).codes)


# -- the rank from the bit budget ----------------------------------------------------------
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (576, 576), (192, 576),
                                   (1536, 576), (37, 300), (64, 172)])
@pytest.mark.parametrize("bits", [0.55, 0.8, 1.0, 1.25, 2.0])
def test_the_rank_is_the_largest_within_the_stored_bits_budget(shape, bits):
    rows, cols = shape
    r = rank_for_bits(rows, cols, bits)
    budget = bits * rows * cols
    assert r >= 1 and factor_bits(rows, cols, r + 1) > budget
    assert r == 1 or factor_bits(rows, cols, r) <= budget
    # the stored bits are every packed byte: two bit streams plus fp16 scales
    assert factor_bits(rows, cols, r) == 8 * (-(-rows * r // 8) + -(-cols * r // 8)) \
        + 16 * (rows + cols)


def test_the_rank_of_a_llama_7b_layer_at_one_bit():
    assert rank_for_bits(4096, 4096, 1.0) == 4096 * 4096 // 8192 - 16 == 2032


def test_a_layer_too_small_for_its_budget_gets_rank_one():
    assert rank_for_bits(8, 8, 0.55) == 1


# -- the method ---------------------------------------------------------------------------
def test_the_error_falls_as_the_bits_rise():
    W, H = correlated(rows=48, cols=96)
    losses, ranks = [], []
    for bits in (0.55, 0.8, 1.0, 1.25, 2.0):
        codes = codes_of(W, H, bits)
        assert codes.stored_bits() <= bits * W.numel()
        ranks.append(codes.rank)
        losses.append(proxy_loss(W, codes.dequantize(), H))
    assert ranks == sorted(set(ranks))  # strictly more factor columns per step
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


def test_zero_weights_and_dead_input_channels_give_finite_codes():
    W, H = correlated(rows=12, cols=40, seed=6)
    H[3], H[:, 3] = 0, 0  # an input channel that is always zero
    W[0] = 0
    codes = codes_of(W, H, 1.0)
    assert torch.isfinite(codes.dequantize()).all()
    assert torch.equal(codes_of(torch.zeros(12, 40), H, 1.0).dequantize(), torch.zeros(12, 40))


@pytest.mark.parametrize("bits", ["0.5", "2.5", "-1"])
def test_bits_outside_the_range_are_refused(bits):
    with pytest.raises(MethodArgumentError, match=r"bits=.*0\.55 to 2\.0"):
        get_method("binary-factor", {"bits": bits})


def test_block_feedback_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="binary-factor runs with feedback='none' or "
                                          "feedback='column' only"):
        QuantizeConfig("binary-factor", feedback="block")
    QuantizeConfig("binary-factor", feedback="none")
    QuantizeConfig("binary-factor", feedback="column")
    QuantizeConfig("q1_0", feedback="block")  # other methods keep every feedback


def column_error(w, A, v, s) -> float:
    return float(((w - s * (A @ v)) ** 2).sum())


@pytest.mark.parametrize("seed", range(4))
def test_a_column_fit_beats_the_least_squares_signs_and_its_scale_is_least_squares(seed):
    g = torch.Generator().manual_seed(seed)
    rows, r = 40, 12
    A = torch.randn(rows, r, generator=g) * torch.rand(rows, 1, generator=g)
    w = torch.randn(rows, generator=g)
    grid = FactorGrid(codes=None, SU=None, A=A, A_pinv=torch.linalg.pinv(A), gram=A.T @ A)
    v, s = fit_column(w, grid, flips=100)
    assert set(v.tolist()) <= {-1.0, 1.0}
    Av = A @ v
    assert s == pytest.approx(float(Av @ w) / float(Av @ Av), rel=1e-5)
    v0 = torch.where(torch.linalg.pinv(A) @ w >= 0, 1.0, -1.0)
    Av0 = A @ v0
    s0 = float(Av0 @ w) / float(Av0 @ Av0)
    assert column_error(w, A, v, s) <= column_error(w, A, v0, s0) + 1e-6
    # no single flip of the result lowers the error at its own scale (a greedy optimum)
    for k in range(r):
        u = v.clone()
        u[k] = -u[k]
        assert column_error(w, A, u, s) >= column_error(w, A, v, s) - 1e-5


@pytest.mark.parametrize("seed", range(3))
def test_column_feedback_lowers_the_proxy_loss_and_its_codes_are_its_weights(seed):
    W, H = correlated(128, 256, seed=seed)  # on small layers it may not (48 × 96: ±2 %)
    method = get_method("binary-factor", {"bits": 1.0})
    plain = reconstruct(W, H, method)
    fed = reconstruct(W, H, method, feedback="column")
    assert torch.equal(fed.calibrated.dequantize(), fed.calibrated_Q)  # the loop's own weights
    assert isinstance(fed.codes, FactorCodes) and fed.codes.rank == plain.codes.rank
    assert torch.equal(fed.codes.u, plain.codes.u)  # the left factor is the initialisation's

    def loss(Q):  # tr((W − Q) H (W − Q)ᵀ)
        E = W - Q
        return float(torch.trace(E @ H @ E.T))

    assert loss(fed.Q) < 0.9 * loss(plain.Q)


def test_the_initialisation_beats_random_signs_with_the_same_scale_fit():
    W, H = correlated(rows=48, cols=64, seed=3)
    codes = codes_of(W, H, 1.0)
    r = codes.rank
    assert r == 11
    g = torch.Generator().manual_seed(0)
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * float(H.diagonal().mean()))
    init = proxy_loss(W, codes.dequantize(), H)
    for _ in range(3):  # random signs of the same rank, scales fitted by the same least squares
        SU = torch.randint(0, 2, (48, r), generator=g).float() * 2 - 1
        SV = torch.randint(0, 2, (64, r), generator=g).float() * 2 - 1
        s_out, s_in = fit_scales(W, SU @ SV.T, Hd, torch.ones(64), 4)
        random = s_out[:, None] * (SU @ SV.T) * s_in[None, :]
        assert init < 0.85 * proxy_loss(W, random, H)


def test_a_sign_sweep_never_raises_the_error_and_picks_the_best_sign_at_rank_one():
    g = torch.Generator().manual_seed(7)
    Wt = torch.randn(9, 14, generator=g)
    m, m_other = torch.rand(9, generator=g) + 0.1, torch.rand(14, generator=g) + 0.1

    def err(S, So):
        return float((Wt - m[:, None] * (S @ (So * m_other[:, None]).T)).pow(2).sum())

    S = torch.randint(0, 2, (9, 4), generator=g).float() * 2 - 1
    So = torch.randint(0, 2, (14, 4), generator=g).float() * 2 - 1
    before = err(S, So)
    after = err(sign_sweep(Wt, S.clone(), So, m, m_other), So)
    assert after <= before
    S1 = -torch.ones(9, 1)  # rank one: every row's best sign, by trying both
    So1 = torch.randint(0, 2, (14, 1), generator=g).float() * 2 - 1
    best = torch.tensor([[min((-1.0, 1.0), key=lambda s: float(
        (Wt[i] - m[i] * s * So1[:, 0] * m_other).pow(2).sum()))] for i in range(9)])
    assert torch.equal(sign_sweep(Wt, S1, So1, m, m_other), best)


def test_the_scale_fit_equals_a_naive_least_squares():
    """One alternation of fit_scales: s_out row by row, then s_in by lstsq over every row."""
    W, H = correlated(rows=6, cols=11, seed=1)
    H = H.double() + 0.1 * torch.eye(11, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    P = (torch.randint(0, 2, (6, 3), generator=g).double() * 2 - 1) @ \
        (torch.randint(0, 2, (11, 3), generator=g).double() * 2 - 1).T
    s_in0 = torch.rand(11, generator=g, dtype=torch.float64) + 0.5
    s_out, s_in = fit_scales(W, P, H, s_in0, 1)
    Wd = W.double()
    naive_out = []
    for i in range(6):
        p = P[i] * s_in0
        naive_out.append(float(Wd[i] @ H @ p) / float(p @ H @ p))
    torch.testing.assert_close(s_out.double(), torch.tensor(naive_out, dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    L = torch.linalg.cholesky(H)  # H = L Lᵀ: the loss is Σ_i ‖(w_i − s_out_i p_i ⊙ s_in) L‖²
    so = s_out.double()
    D = torch.cat([(so[i] * P[i][:, None] * L).T for i in range(6)])  # (6·11, 11)
    b = torch.cat([Wd[i] @ L for i in range(6)])
    naive_in = torch.linalg.lstsq(D, b[:, None]).solution[:, 0]
    torch.testing.assert_close(s_in.double(), naive_in, rtol=1e-4, atol=1e-6)


# -- codes, packed format ------------------------------------------------------------------
def test_codes_dequantize_is_the_scaled_sign_product():
    c = factor_codes(rows=5, cols=9, rank=3)
    SU, SV = c.u.double() * 2 - 1, c.v.double() * 2 - 1
    naive = torch.tensor([[float(c.s_out[i]) * sum(float(SU[i, j] * SV[k, j]) for j in range(3))
                           * float(c.s_in[k]) for k in range(9)] for i in range(5)],
                         dtype=torch.float64)
    torch.testing.assert_close(c.dequantize().double(), naive, rtol=1e-6, atol=0)
    assert c.paper_bits() == 3 * (5 + 9) / 45
    assert c.stored_bits() == 8 * (2 + 4) + 16 * 14  # ⌈15/8⌉, ⌈27/8⌉ bytes; 14 fp16 scales


@pytest.mark.parametrize("shape", [(1, 37), (13, 200), (37, 131)])
@pytest.mark.parametrize("bits", [0.55, 1.0])
def test_method_codes_round_trip_exactly_through_the_packed_format(shape, bits):
    W, H = correlated(*shape, seed=2)
    codes = codes_of(W, H, bits)
    layout, tensors = pack(codes)
    assert layout.format == "factor" and layout.params["rank"] == codes.rank
    back = unpack(layout, tensors)
    assert torch.equal(back.dequantize(), codes.dequantize())
    assert sum(t.numel() * t.element_size() for t in tensors.values()) * 8 \
        == codes.stored_bits() == layout.stored_bits()


# -- kernels -------------------------------------------------------------------------------
ODD = [(1, 37, 0.55), (13, 200, 0.8), (37, 300, 1.0), (29, 131, 2.0)]  # r = 1 in the first


@pytest.mark.parametrize("rows,cols,bits", ODD)
def test_the_kernel_form_is_two_sign_stages_equal_to_dequantize(rows, cols, bits):
    W, H = correlated(rows, cols, seed=4)
    codes = codes_of(W, H, bits)
    form = kernel_form(codes)
    assert isinstance(form, ChainForm) and len(form.stages) == 2
    assert (form.stages[0].rows, form.stages[0].cols) == (codes.rank, cols)
    assert (form.stages[1].rows, form.stages[1].cols) == (rows, codes.rank)
    Q = codes.dequantize()
    assert torch.allclose(form_dense(form), Q, rtol=0, atol=1e-5 * float(Q.abs().max()))
    for N in (1, 3, 40):
        x = inputs(N, cols)
        check(form_matmul_torch(form, x), x, Q)
        check(form_matmul(form, x), x, Q)  # the registry's kernel for a CPU tensor


def test_rank_one_codes_on_odd_shapes():
    assert rank_for_bits(1, 37, 0.55) == 1
    codes = factor_codes(rows=3, cols=19, rank=1, seed=6)
    x = inputs(5, 19)
    check(form_matmul_torch(kernel_form(codes), x), x, codes.dequantize())


@needs_extension
@pytest.mark.parametrize("impl", list(cpu.IMPLS))
@pytest.mark.parametrize("rows,cols,bits", ODD)
def test_cpu_kernels_compute_the_factor_product(rows, cols, bits, impl):
    W, H = correlated(rows, cols, seed=5)
    codes = codes_of(W, H, bits)
    form, Q = kernel_form(codes), codes.dequantize()
    for N in BATCHES:
        x = inputs(N, cols)
        check(cpu.form_matmul(form, x, impl), x, Q)


def test_a_binary_linear_of_factor_codes_computes_its_dequantized_weight():
    codes = factor_codes(rows=21, cols=45, rank=7, seed=1)
    layer = BinaryLinear.from_codes(codes, torch.randn(21))
    x = inputs(4, 45)
    ref = x @ codes.dequantize().T + layer.bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert layer.kernel_form().nbytes() < 45 * 21 * 4  # bits and scales, no fp32 weight


# -- the engine: report, refinement --------------------------------------------------------
def test_without_refine_the_report_says_refinement_was_not_run(caplog):
    model = tiny_llama()
    report = binarize_model(model, QuantizeConfig("binary-factor"), calibration(n=2))
    assert report.refine == []
    assert any("without refinement" in n and "--refine block" in n for n in report.notes)
    assert report.to_dict()["notes"] == report.notes
    assert "without refinement" in caplog.text
    plain = binarize_model(tiny_llama(), QuantizeConfig("rtn-sign"), calibration(n=2))
    assert plain.notes == [] and "notes" not in plain.to_dict()


def test_refinement_lowers_the_layer_loss_of_the_factors():
    model = tiny_llama()
    batches = calibration()
    plain, refined = copy.deepcopy(model), copy.deepcopy(model)
    binarize_model(plain, QuantizeConfig("binary-factor"), batches)
    report = binarize_model(refined, QuantizeConfig("binary-factor", refine=FAST), batches)
    assert report.notes == []
    first = report.refine[0]
    assert first.kept and first.loss_after < first.loss_before
    assert layer0_error(model, refined, batches) < layer0_error(model, plain, batches)
    for codes in report.codes.values():  # the trained codes keep their layout and bits
        assert isinstance(codes, FactorCodes)
        assert torch.equal(codes.s_out, codes.s_out.half().float())


def test_latent_magnitudes_are_the_least_squares_factors_along_the_stored_signs():
    codes = factor_codes(rows=13, cols=37, rank=5, seed=4)
    m = codes.latent_magnitudes(codes.dequantize())  # W is the codes' own: U* = S_U, V* = S_V
    assert m["u"].shape == (13, 5) and m["v"].shape == (37, 5)
    for f in ("u", "v"):
        torch.testing.assert_close(m[f], torch.ones_like(m[f]), rtol=0, atol=2e-2)
    flipped = codes.u.clone()
    flipped[0, 0] = ~flipped[0, 0]
    W = FactorCodes(flipped, codes.v, codes.s_out, codes.s_in).dequantize()
    m = codes.latent_magnitudes(W)["u"]
    assert float(m[0, 0]) == pytest.approx(1e-3)  # the fit wants the other sign: flips first
    assert float(m[1:].min()) > 0.9


# -- stories260K: save, load, inspect; the command line -------------------------------------
def test_stories260k_saves_loads_and_inspects(capsys, stories_path, stories_tokenizer, tmp_path):
    from test_checkpoint import logits, quantize

    import binllm
    from binllm.packed.checkpoint import save_binarized
    from binllm.packed.layers import set_kernels
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_path)
    report = quantize(model, "binary-factor", 512, seqlen=32)
    for r in report.linears:  # within the budget, but for layers too small for rank 1
        assert r.stored_bits <= 1.0 or report.codes[r.name].rank == 1, r
    out = save_binarized(model, report, stories_tokenizer, tmp_path / "stories")
    loaded = binllm.load(out)
    torch.testing.assert_close(logits(loaded, 512), logits(model, 512), rtol=1e-4, atol=1e-4)
    set_kernels(loaded, False)
    assert torch.equal(logits(loaded, 512), logits(model, 512))
    code, text, _ = run_cli(capsys, "inspect", out, "--report", tmp_path / "i.json")
    assert code == 0 and "factor" in text and "binary-factor" in text
    info = json.loads((tmp_path / "i.json").read_text())
    by_name = {r.name: r for r in report.linears}
    for lay in info["layers"]:
        assert lay["stored_bits"] == by_name[lay["name"]].stored_bits


def test_the_command_line_refuses_bits_out_of_range_and_block_feedback(capsys, stories, data):
    code, _, err = run_cli(capsys, "quantize", stories, "--method", "binary-factor",
                           "--method-arg", "bits=0.3", "--data-dir", data)
    one_line_error(code, err, "bits=0.3", "0.55 to 2.0")
    code, _, err = run_cli(capsys, "quantize", stories, "--method", "binary-factor",
                           "--feedback", "block", "--data-dir", data)
    one_line_error(code, err, "block", "binary-factor runs with --feedback none or --feedback "
                   "column only")


def test_compare_takes_binary_factor_specs():
    from binllm.evaluation.compare import parse_method_specs

    runs = parse_method_specs("binary-factor:bits=0.8,binary-factor:bits=0.8:refine=block")
    assert [r.method for r in runs] == ["binary-factor"] * 2
    assert runs[0].args == (("bits", "0.8"),) and runs[1].engine == (("refine", "block"),)
    (fed,) = parse_method_specs("binary-factor:bits=1.0:feedback=column:flips=32")
    assert fed.args == (("bits", "1.0"), ("flips", "32"))
    assert fed.engine_argv() == ["--feedback", "column"]
    from argparse import Namespace

    from binllm.cli.compare import check_run

    check_run(fed, Namespace(block_size=128, percdamp=0.01))  # accepted as quantize takes it
