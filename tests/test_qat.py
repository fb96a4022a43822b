"""PB-LLM QAT (PB-LLM §3.3 and its reference code): STE, frozen salient weights, α*, training,
resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from binllm.methods.codes import PartialBinaryCodes, to_storage
from binllm.qat.model import (
    PartialBinaryLinear,
    QATConfig,
    QATError,
    finalize_qat,
    outlier_mask,
    prepare_qat,
    qat_codes,
    qat_modules,
    to_plain_linears,
)
from binllm.qat.train import train_qat, training_windows

W4 = torch.tensor([[0.5, -0.25, 3.0, 0.125],
                   [-1.0, 0.75, -0.5, -2.0]])
MASK4 = torch.tensor([[False, False, True, False],
                      [False, False, False, True]])


@pytest.fixture(scope="module")
def c4_tokens(shared, stories_tokenizer):
    from binllm.evaluation.data import load_text, tokenize

    text = load_text("c4", "train", shared / "data").text[:60_000]
    return tokenize(stories_tokenizer, text)  # (1, N)


def small_config(**kw):
    base = {"steps": 6, "batch_size": 2, "grad_accum": 2, "seqlen": 64, "lr": 2e-3,
            "warmup_ratio": 0.2}
    return QATConfig(**{**base, **kw})


# -- the layer -----------------------------------------------------------------------------
def test_golden_alpha_and_effective_weight():
    layer = PartialBinaryLinear(W4, None, MASK4)
    # α = mean |w| over the 6 non-salient entries = (.5+.25+.125+1+.75+.5)/6 = 3.125/6
    alpha = to_storage(torch.tensor(3.125 / 6))
    assert layer.alpha() == alpha
    # salient values: 8-bit per-row min–max over the full row (row 0 [−.25, 3], row 1 [−2, .75])
    s = to_storage(torch.tensor([3.25 / 255, 2.75 / 255]))
    z = torch.round(torch.tensor([0.25, 2.0]) / s)
    q = torch.clamp(torch.round(W4 / s[:, None]) + z[:, None], 0, 255)
    high = s[:, None] * (q - z[:, None])
    want = torch.where(MASK4, high, alpha * torch.where(W4 >= 0, 1.0, -1.0))
    assert torch.equal(layer.effective_weight(), want)
    assert abs(want[0, 2] - 3.0) < s[0] and abs(want[1, 3] + 2.0) < s[1]


def test_outlier_mask_takes_half_the_fraction_from_each_tail():
    # n = 10, f = 0.4: lower = 2nd smallest (k = ⌊10·0.2⌋ = 2) → 1 weight below it;
    # upper = 8th smallest (k = ⌊10·0.8⌋ = 8) → 2 weights above it (signed values, not |w|)
    W = torch.tensor([[0.3, -5.0, 0.1, 4.0, -0.2, 0.0, 2.0, -3.0, 0.5, 6.0]])
    mask = outlier_mask(W, 0.4)
    assert mask.tolist() == [[False, True, False, True, False, False, False, False, False, True]]
    assert not outlier_mask(W, 0.0).any()


def test_ste_passes_gradients_to_latent_weights():
    g = torch.Generator().manual_seed(0)
    layer = PartialBinaryLinear(W4, torch.zeros(2), MASK4)
    X = torch.randn(5, 4, generator=g)
    G = torch.randn(5, 2, generator=g)
    (layer(X) * G).sum().backward()
    # ∂L/∂Ŵ = Gᵀ X; sign passes it unchanged, α (detached) scales it, salient entries get 0
    want = layer.alpha() * (G.T @ X) * (~MASK4)
    assert torch.allclose(layer.weight.grad, want, atol=1e-6)
    assert (layer.weight.grad[~MASK4] != 0).all()
    assert torch.allclose(layer.bias.grad, G.sum(0))


def test_alpha_is_recomputed_from_latent_weights_every_forward():
    layer = PartialBinaryLinear(W4, None, MASK4)
    with torch.no_grad():
        layer.weight.mul_(2)
        layer.weight[MASK4] = 100.0  # salient latents never enter α
    assert layer.alpha() == to_storage(torch.tensor(6.25 / 6))
    w = layer.effective_weight()
    assert torch.equal(w[~MASK4].abs(), layer.alpha().expand(6))


def test_to_codes_dequantize_equals_forward_weight():
    layer = PartialBinaryLinear(torch.randn(6, 20), None, outlier_mask(torch.randn(6, 20), 0.2))
    c = layer.to_codes()
    assert isinstance(c, PartialBinaryCodes)
    assert torch.equal(c.dequantize(), layer.effective_weight())
    assert (c.mu == 0).all() and (c.alpha == layer.alpha()).all() and c.alpha.shape == (6, 1)


# -- preparing a model ---------------------------------------------------------------------
def test_prepare_swaps_decoder_linears_and_freezes_the_rest(tiny_llama_model):
    model = tiny_llama_model
    names = prepare_qat(model, QATConfig(salient_fraction=0.1))
    assert len(names) == 2 * 7 and all(".layers." in n for n in names)
    assert isinstance(model.lm_head, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.weight" for n in names}
    for m in qat_modules(model).values():
        frac = m.salient.float().mean().item()
        assert 0.09 < frac <= 0.1


def test_lm_head_is_an_option_and_unties_the_embedding(stories_model):
    model = stories_model
    emb = model.model.embed_tokens.weight.detach().clone()
    names = prepare_qat(model, QATConfig(include_lm_head=True))
    assert "lm_head" in names and isinstance(model.lm_head, PartialBinaryLinear)
    assert torch.equal(model.model.embed_tokens.weight, emb)  # embedding stays full precision


def test_masks_from_pbllm_ptq_codes(tiny_llama_model):
    import copy

    from binllm.engine.binarize import binarize_model
    from binllm.engine.config import QuantizeConfig

    model = tiny_llama_model
    calib = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i))
             for i in range(4)]
    report = binarize_model(copy.deepcopy(model), QuantizeConfig("pbllm-10"), calib)
    prepare_qat(model, QATConfig(), masks=report.codes)
    for name, m in qat_modules(model).items():
        assert torch.equal(m.salient, report.codes[name].salient)


def test_to_plain_linears_keeps_the_logits(tiny_llama_model):
    model = tiny_llama_model
    prepare_qat(model, QATConfig())
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    codes = to_plain_linears(model)
    assert not qat_modules(model) and len(codes) == 14
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    for name, c in codes.items():
        assert torch.equal(model.get_submodule(name).weight, c.dequantize())


# -- bad input -----------------------------------------------------------------------------
def test_bad_input_gets_clear_errors(tiny_llama_model):
    with pytest.raises(QATError, match="at least one step"):
        QATConfig(steps=0)
    with pytest.raises(QATError, match="checkpoint_path"):
        QATConfig(checkpoint_every=5)
    model = tiny_llama_model
    tokens = torch.randint(0, 256, (1, 1000))
    with pytest.raises(QATError, match="call prepare_qat first"):
        train_qat(model, tokens, small_config())
    prepare_qat(model, QATConfig())
    with pytest.raises(QATError, match="no nn.Linear to train"):
        prepare_qat(model, QATConfig())
    with pytest.raises(QATError, match="fewer than one batch"):
        train_qat(model, tokens[:, :100], small_config())


# -- training on stories260K ---------------------------------------------------------------
def mean_loss(model, windows):
    model.eval()
    with torch.no_grad():
        return sum(model(input_ids=w, labels=w).loss.item() for w in windows) / len(windows)


def test_training_lowers_loss_and_keeps_salient_weights(stories_model, c4_tokens):
    model = stories_model
    cfg = small_config(steps=12)
    prepare_qat(model, cfg)
    mods = qat_modules(model)
    before = {n: (m.effective_weight().detach().clone(), m.weight.detach().clone())
              for n, m in mods.items()}
    probe = [training_windows(c4_tokens, cfg, s).reshape(-1, cfg.seqlen) for s in range(4)]
    loss0 = mean_loss(model, probe)
    result = train_qat(model, c4_tokens, cfg)
    assert result.step == 12 and len(result.losses) == 12
    assert mean_loss(model, probe) < loss0 - 0.3
    for n, m in mods.items():
        w0, latent0 = before[n]
        assert torch.equal(m.effective_weight()[m.salient], w0[m.salient])
        assert torch.equal(m.weight[m.salient], latent0[m.salient])
        assert not torch.equal(m.weight[~m.salient], latent0[~m.salient])
        keep = ~m.salient
        assert m.alpha() == to_storage(m.weight.detach().abs()[keep].mean())


class Interrupted(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(stories_path, c4_tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    def fresh():
        model = AutoModelForCausalLM.from_pretrained(stories_path)
        prepare_qat(model, cfg)
        return model

    cfg = small_config(steps=6, checkpoint_every=3, checkpoint_path=str(tmp_path / "ck.pt"))
    full = fresh()
    ref = train_qat(full, c4_tokens, small_config(steps=6))

    def crash(info):
        if info.step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_qat(fresh(), c4_tokens, cfg, callback=crash)
    assert (tmp_path / "ck.pt").is_file() and not (tmp_path / ".ck.pt.tmp").exists()
    resumed_model = fresh()
    resumed = train_qat(resumed_model, c4_tokens, cfg, resume=tmp_path / "ck.pt")
    assert resumed.start_step == 3 and resumed.step == 6
    assert resumed.losses == ref.losses
    for (n, a), (_, b) in zip(qat_modules(full).items(), qat_modules(resumed_model).items()):
        assert torch.equal(a.weight, b.weight), n
    with pytest.raises(QATError, match="different settings"):
        train_qat(fresh(), c4_tokens, small_config(steps=6, lr=1e-3), resume=tmp_path / "ck.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(QATError, match="damaged"):
        train_qat(fresh(), c4_tokens, cfg, resume=tmp_path / "bad.pt")


def test_qat_codes_and_gradient_checkpointing(stories_path, stories_model, c4_tokens):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(stories_path)
    prepare_qat(plain, small_config(steps=2))
    want = train_qat(plain, c4_tokens, small_config(steps=2)).losses
    model = stories_model
    cfg = small_config(steps=2, gradient_checkpointing=True)
    prepare_qat(model, cfg)
    def checkpointing():
        return (model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing")
                else model.is_gradient_checkpointing)

    seen = []
    result = train_qat(model, c4_tokens, cfg, callback=lambda info: seen.append(checkpointing()))
    assert seen == [True, True] and not checkpointing()
    assert result.losses == pytest.approx(want, rel=1e-5)
    codes = qat_codes(model)
    assert len(codes) == 35
    for name, c in codes.items():
        assert torch.equal(c.dequantize(), model.get_submodule(name).effective_weight())
        assert c.paper_bits() == pytest.approx(1.7, abs=0.02)


# -- packed format and CLI -----------------------------------------------------------------
def test_finalize_saves_through_the_packed_format(stories_model, c4_tokens, tmp_path):
    checkpoint = pytest.importorskip("binllm.packed.checkpoint")
    model = stories_model
    cfg = small_config(steps=2)
    prepare_qat(model, cfg)
    train_qat(model, c4_tokens, cfg)
    want = qat_codes(model)
    report = finalize_qat(model, cfg)
    assert report.method == "pbllm-qat" and set(report.codes) == set(want)
    assert report.paper_bits == pytest.approx(1.7, abs=0.02)
    ids = c4_tokens[:, :64]
    with torch.no_grad():
        before = model(ids).logits
    checkpoint.save_binarized(model, report, None, tmp_path / "out")
    loaded = checkpoint.load_binarized(tmp_path / "out", kernels=False)
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_cli_qat_trains_reports_and_resumes(stories_path, shared, tmp_path):
    import json

    from binllm.cli import main

    text = tmp_path / "train.txt"
    text.write_text((shared / "data" / "c4" / "c4_sample_200docs.jsonl").read_text()[:40_000])
    common = [str(stories_path), "--data-dir", str(shared / "data"), "--train", str(text),
              "--eval", "tinystories", "--steps", "4", "--seqlen", "64", "--max-windows", "2",
              "--checkpoint", str(tmp_path / "ck.pt"), "--checkpoint-every", "2"]
    assert main(["-q", "qat", *common, "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["training"]["step"] == 4 and len(report["training"]["losses"]) == 4
    assert report["quantization"]["method"] == "pbllm-qat"
    assert report["perplexity"]["tinystories"]["windows"] == 2
    assert main(["-q", "qat", *common, "--resume", "--report", str(tmp_path / "r2.json")]) == 0
    again = json.loads((tmp_path / "r2.json").read_text())
    assert again["training"]["start_step"] == 4
    assert again["training"]["losses"] == report["training"]["losses"]
    assert main(["-q", "qat", *common, "--steps", "0"]) == 2  # clear error, exit code 2
