"""Distillation against the FP logits (`--distill logits`) on stories260K and tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import quantize_and_reload, run_cli, tiny_llama

from binllm.engine.binarize import binarize_model
from binllm.engine.config import ConfigError, DistillConfig, QuantizeConfig, RefineConfig
from binllm.engine.distill import (TeacherTargets, distill_windows, teacher_samples,
                                  teacher_targets, topk_kl)

FAST = DistillConfig(epochs=3, lr=1e-2, topk=32)


def calibration(n: int = 6, seqlen: int = 64, vocab: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(n)]


def held_out_kl(model, teacher, batches, k: int) -> float:
    """Mean top-k KL of `model` against `teacher` on batches, measured apart from the stage."""
    targets = teacher_targets(teacher, batches, k)
    with torch.no_grad():
        return sum(float(topk_kl(model(ids).logits, t))
                   for ids, t in zip(batches, targets)) / len(batches)


def test_topk_kl_over_the_whole_vocabulary_is_the_kl_divergence():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=g)
    student = torch.randn(2, 5, 11, generator=g)
    top, idx = teacher.topk(11, dim=-1)
    t = TeacherTargets(logprobs=top.log_softmax(-1).half(), tokens=idx.int())
    q, logp = teacher.softmax(-1), student.log_softmax(-1)
    naive = sum(float((q[b, s] * (q[b, s].log() - logp[b, s])).sum())
                for b in range(2) for s in range(5)) / 10
    assert float(topk_kl(student, t)) == pytest.approx(naive, abs=2e-3)  # fp16 log q
    assert float(topk_kl(teacher, t)) == pytest.approx(0.0, abs=2e-3)


def test_topk_targets_are_the_teachers_most_likely_tokens_renormalised(stories_model):
    batches = calibration(n=2, vocab=stories_model.config.vocab_size)
    (t, _) = teacher_targets(stories_model, batches, 5)
    with torch.no_grad():
        logits = stories_model(batches[0]).logits
    assert t.tokens.shape == (1, 64, 5)
    assert torch.equal(t.tokens.long(), logits.topk(5, dim=-1).indices)
    assert torch.allclose(t.logprobs.float().exp().sum(-1), torch.ones(1, 64), atol=5e-3)


@pytest.mark.parametrize("method", ["q1_0", "arb-llm-rc"])
def test_distillation_lowers_the_kl_on_held_out_windows(method, stories_model):
    vocab = stories_model.config.vocab_size
    batches, held = calibration(n=8, vocab=vocab), calibration(n=4, vocab=vocab, seed=1)
    plain, distilled = copy.deepcopy(stories_model), copy.deepcopy(stories_model)
    binarize_model(plain, QuantizeConfig(method), batches)
    report = binarize_model(distilled, QuantizeConfig(method, distill=FAST), batches)
    assert report.distill.kept and report.distill.loss_after < report.distill.loss_before
    assert report.distill.steps == 3 * 8 and report.distill.flipped == 0
    assert held_out_kl(distilled, stories_model, held, 32) < held_out_kl(
        plain, stories_model, held, 32)


def test_sampled_text_is_ancestral_sampling_of_the_full_forward(stories_model):
    ids = teacher_samples(stories_model, 3, 12, seed=5, batch=2)
    assert ids.shape == (3, 12)
    # naive oracle: the whole prefix run again at every step, same generator
    g = torch.Generator().manual_seed(5)
    vocab = stories_model.config.vocab_size
    naive = []
    with torch.no_grad():
        for n in (2, 1):
            seq = torch.randint(vocab, (n, 1), generator=g)
            while seq.shape[1] < 12:
                probs = stories_model(seq).logits[:, -1].float().softmax(-1)
                seq = torch.cat([seq, torch.multinomial(probs, 1, generator=g)], dim=1)
            naive.append(seq)
    assert torch.equal(ids, torch.cat(naive))
    assert not torch.equal(ids, teacher_samples(stories_model, 3, 12, seed=6))


@pytest.mark.parametrize("data", ["calib", "sampled", "both"])
def test_distill_windows_hold_the_calibration_tokens_or_as_many_sampled(data, stories_model):
    batches = calibration(n=4, vocab=stories_model.config.vocab_size)  # 4 x (1, 64)
    windows = distill_windows(stories_model, batches,
                              DistillConfig(data=data, sample_len=16))
    calib = batches if data != "sampled" else []
    sampled = windows[len(calib):]
    assert all(torch.equal(a, b) for a, b in zip(windows, calib))
    if data == "calib":
        assert len(windows) == 4
    else:  # 256 tokens in sequences of 16, four to a window
        assert [w.shape for w in sampled] == [(4, 16)] * 4
        assert torch.equal(torch.cat(sampled), teacher_samples(stories_model, 16, 16))


def test_distill_windows_caps_the_calibration_and_samples_as_many_tokens(stories_model):
    batches = calibration(n=4, vocab=stories_model.config.vocab_size)  # 4 x (1, 64)
    windows = distill_windows(stories_model, batches,
                              DistillConfig(data="both", windows=2, sample_len=64))
    assert len(windows) == 4 and torch.equal(windows[1], batches[1])
    assert [w.shape for w in windows[2:]] == [(1, 64)] * 2


def test_distill_windows_sample_as_many_windows_worth_as_sample_windows_asks(stories_model):
    batches = calibration(n=2, vocab=stories_model.config.vocab_size)  # 2 x (1, 64)
    windows = distill_windows(stories_model, batches,
                              DistillConfig(data="both", sample_windows=3, sample_len=32))
    assert len(windows) == 2 + 3 and torch.equal(windows[0], batches[0])
    assert [w.shape for w in windows[2:]] == [(2, 32)] * 3
    assert torch.equal(torch.cat(windows[2:]), teacher_samples(stories_model, 6, 32))


def test_distillation_on_sampled_text_lowers_the_kl_on_held_out_windows(stories_model):
    vocab = stories_model.config.vocab_size
    batches, held = calibration(n=8, vocab=vocab), calibration(n=4, vocab=vocab, seed=1)
    plain, distilled = copy.deepcopy(stories_model), copy.deepcopy(stories_model)
    binarize_model(plain, QuantizeConfig("q1_0"), batches)
    config = DistillConfig(epochs=3, lr=1e-2, topk=32, data="sampled", sample_len=32)
    report = binarize_model(distilled, QuantizeConfig("q1_0", distill=config), batches)
    assert report.distill.kept and report.distill.steps == 3 * 8
    assert held_out_kl(distilled, stories_model, held, 32) < held_out_kl(
        plain, stories_model, held, 32)


def test_the_stored_codes_are_the_distilled_weights_and_bits_do_not_change():
    batches = calibration()
    plain = binarize_model(tiny_llama(), QuantizeConfig("q1_0"), batches)
    model = tiny_llama()
    report = binarize_model(model, QuantizeConfig("q1_0", refine=RefineConfig(epochs=1),
                                                  distill=FAST), batches)
    assert report.stored_bits == plain.stored_bits
    changed = 0
    for name, codes in report.codes.items():
        W = model.get_submodule(name).weight
        assert torch.equal(W, codes.dequantize().to(W.dtype)), name
        changed += not torch.equal(codes.alpha, plain.codes[name].alpha)
    assert changed == len(report.codes)


def test_a_diverging_distillation_is_discarded_for_the_codes_before_it():
    batches = calibration()
    plain = tiny_llama()
    binarize_model(plain, QuantizeConfig("rtn-sign"), batches)
    model = tiny_llama()
    wild = DistillConfig(epochs=3, lr=0.9, sign_lr=0.9, topk=8)
    report = binarize_model(model, QuantizeConfig("rtn-sign", distill=wild), batches)
    assert report.distill.loss_after > report.distill.loss_before and not report.distill.kept
    for (name, a), b in zip(plain.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_distill_settings_are_checked_and_kept_in_the_config():
    for bad, match in (({"epochs": 0}, "epochs"), ({"lr": 1.5}, "lr"), ({"topk": 0}, "topk"),
                       ({"windows": -1}, "windows"), ({"autocast": "fp8"}, "autocast"),
                       ({"data": "c4"}, "data"), ({"sample_len": 1}, "sample_len"),
                       ({"sample_windows": -1}, "sample_windows")):
        with pytest.raises(ConfigError, match=match):
            DistillConfig(**bad)
    c = QuantizeConfig("q1_0", distill=DistillConfig(epochs=3, topk=16))
    assert QuantizeConfig.from_dict(c.to_dict()) == c
    assert "distill" not in QuantizeConfig("q1_0").to_dict()


def test_distill_is_refused_under_torchrun_and_on_a_streamed_model_in_one_line():
    class Rank:  # enough of Distributed for the check before any collective
        world = 2

    with pytest.raises(ConfigError, match="whole model"):
        binarize_model(tiny_llama(), QuantizeConfig("q1_0", distill=FAST), calibration(),
                       dist=Rank(), checked=True)
    with pytest.raises(ConfigError, match="not streamed"):
        binarize_model(tiny_llama(), QuantizeConfig("q1_0", distill=FAST), calibration(),
                       source=object(), checked=True)


def test_a_distilled_model_saves_reloads_and_evaluates_to_the_same_perplexity(
        capsys, tmp_path, stories_path, data):
    first, again = quantize_and_reload(capsys, tmp_path, stories_path, data,
                                       "--distill", "logits", "--distill-arg", "epochs=2",
                                       "--distill-arg", "topk=16")
    assert first["quantization"]["config"]["distill"]["topk"] == 16
    assert first["quantization"]["distill"]["steps"] == 2 * 4
    assert again["perplexity"]["tinystories"]["ppl"] == first["perplexity"]["tinystories"]["ppl"]


def test_cli_refuses_distill_args_without_distill(capsys, stories_path):
    code, _, err = run_cli(capsys, "quantize", str(stories_path), "--method", "q1_0",
                           "--distill-arg", "epochs=2")
    assert code == 2 and "--distill-arg needs --distill logits" in err


def test_a_compare_spec_carries_distill_to_the_quantize_command():
    from binllm.evaluation.compare_spec import parse_method_spec

    run = parse_method_spec("q1_0:refine=block:distill=logits:distill_epochs=1:refine_lr=0.01")
    assert run.engine_argv() == ["--refine", "block", "--distill", "logits",
                                 "--distill-arg", "epochs=1", "--refine-arg", "lr=0.01"]
