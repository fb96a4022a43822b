"""Block-wise refinement (`--refine block`) on stories260K and tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import quantize_and_reload, run_cli, tiny_llama

from binllm.engine.binarize import binarize_model
from binllm.engine.config import ConfigError, QuantizeConfig, RefineConfig
from binllm.engine.walker import capture_layer_inputs, find_decoder_layers, run_layer

FAST = RefineConfig(epochs=2, lr=1e-2, sign_lr=3e-3)


def calibration(n: int = 6, seqlen: int = 64, vocab: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(n)]


def layer0_error(original, quantized, batches) -> float:
    """Mean squared error of quantized's layer 0 against original's on their common inputs
    (layer 0 reads the embeddings, which quantization leaves alone)."""
    _, layers = find_decoder_layers(original)
    _, qlayers = find_decoder_layers(quantized)
    with torch.no_grad():
        inputs = capture_layer_inputs(original, layers, batches, "cpu")
        errs = [torch.nn.functional.mse_loss(run_layer(qlayers[0], h, kw),
                                             run_layer(layers[0], h, kw))
                for h, kw in zip(inputs.hidden, inputs.kwargs)]
    return float(sum(errs) / len(errs))


@pytest.mark.parametrize("method", ["q1_0", "arb-llm-rc", "billm", "pbllm", "gptq"])
def test_refinement_never_raises_the_layer_error_it_optimises(method, stories_model):
    import copy

    batches = calibration(vocab=stories_model.config.vocab_size)
    plain, refined = copy.deepcopy(stories_model), copy.deepcopy(stories_model)
    binarize_model(plain, QuantizeConfig(method), batches)
    report = binarize_model(refined, QuantizeConfig(method, refine=FAST), batches)
    assert len(report.refine) == stories_model.config.num_hidden_layers
    for r in report.refine:
        assert (r.loss_after <= r.loss_before) == r.kept
    # measured independently of the report: layer 0 sees the same inputs in both runs
    assert layer0_error(stories_model, refined, batches) <= layer0_error(
        stories_model, plain, batches)
    assert report.refine[0].kept and report.refine[0].loss_after < report.refine[0].loss_before


def test_a_diverging_refinement_is_discarded_for_the_method_codes():
    model = tiny_llama()
    batches = calibration()
    import copy

    plain = copy.deepcopy(model)
    binarize_model(plain, QuantizeConfig("rtn-sign"), batches)
    wild = RefineConfig(epochs=3, lr=0.9, sign_lr=0.9)
    report = binarize_model(model, QuantizeConfig("rtn-sign", refine=wild), batches)
    assert report.refine[0].loss_after > report.refine[0].loss_before
    assert not report.refine[0].kept
    _, a = find_decoder_layers(plain)
    _, b = find_decoder_layers(model)
    assert torch.equal(a[0].self_attn.q_proj.weight, b[0].self_attn.q_proj.weight)


def test_the_stored_codes_are_the_refined_weights_and_bits_do_not_change():
    model = tiny_llama()
    batches = calibration()
    plain = binarize_model(tiny_llama(), QuantizeConfig("q1_0"), batches)
    report = binarize_model(model, QuantizeConfig("q1_0", refine=FAST), batches)
    assert report.stored_bits == plain.stored_bits
    for name, codes in report.codes.items():
        W = model.get_submodule(name).weight
        assert torch.equal(W, codes.dequantize().to(W.dtype)), name


def test_refine_settings_are_checked_and_kept_in_the_config():
    with pytest.raises(ConfigError, match="epochs"):
        RefineConfig(epochs=0)
    with pytest.raises(ConfigError, match="sign_lr"):
        RefineConfig(sign_lr=2.0)
    c = QuantizeConfig("q1_0", refine=RefineConfig(epochs=3), rotate="hadamard")
    assert QuantizeConfig.from_dict(c.to_dict()) == c
    assert "refine" not in QuantizeConfig("q1_0").to_dict()  # a plain run's dict as before
    with pytest.raises(ConfigError, match="rotate"):
        QuantizeConfig("q1_0", rotate="givens")


def test_a_refined_model_saves_reloads_and_evaluates_to_the_same_perplexity(
        capsys, tmp_path, stories_path, data):
    first, again = quantize_and_reload(capsys, tmp_path, stories_path, data,
                                       "--refine", "block", "--refine-arg", "epochs=1")
    assert len(first["quantization"]["refine"]) == 5
    assert first["quantization"]["config"]["refine"]["epochs"] == 1
    assert again["perplexity"]["tinystories"]["ppl"] == first["perplexity"]["tinystories"]["ppl"]


def test_cli_refuses_refine_args_without_refine(capsys, stories_path):
    code, _, err = run_cli(capsys, "quantize", str(stories_path), "--method", "q1_0",
                           "--refine-arg", "epochs=2")
    assert code == 2 and "--refine block" in err


def test_a_refined_run_resumed_after_a_crash_ends_with_the_same_weights(tmp_path):
    import copy

    from binllm.engine.journal import LayerJournal, run_identity

    class Crash(RuntimeError):
        pass

    base, batches = tiny_llama(), calibration()
    config = QuantizeConfig("q1_0", refine=FAST)
    reference = copy.deepcopy(base)
    binarize_model(reference, config, batches)

    def crash_after_first(done, total):
        if done == 1:
            raise Crash

    journal = LayerJournal(tmp_path / "j", run_identity(base, config, batches))
    with pytest.raises(Crash):
        binarize_model(copy.deepcopy(base), config, batches, journal=journal,
                       on_layer=crash_after_first)
    resumed = copy.deepcopy(base)
    journal = LayerJournal(tmp_path / "j", run_identity(base, config, batches))
    report = binarize_model(resumed, config, batches, journal=journal)
    assert [r.layer for r in report.refine] == [1]  # layer 0 came from the journal
    for (name, a), b in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_the_token_loss_weighs_every_token_alike():
    """A token with a 100× larger FP output and the same relative error counts as much as
    the others under loss="token" (and dominates under "mse")."""
    from binllm.engine.refine import LayerRefiner

    y = torch.ones(1, 4, 8)
    y[0, 0] *= 100  # a massive-activation token
    out = y * 1.1  # 10 % error everywhere
    token = LayerRefiner(RefineConfig(loss="token"))._error(out, y)
    mse = LayerRefiner(RefineConfig(loss="mse"))._error(out, y)
    assert float(token) == pytest.approx(0.01)
    naive = sum(((out[0, t] - y[0, t]) ** 2).mean() for t in range(4)) / 4
    assert float(mse) == pytest.approx(float(naive))
    with pytest.raises(ConfigError, match="loss"):
        RefineConfig(loss="l1")


def test_a_refine_arg_without_a_value_names_its_flag(capsys, stories_path):
    code, _, err = run_cli(capsys, "quantize", str(stories_path), "--method", "q1_0",
                           "--refine", "block", "--refine-arg", "epochs")
    assert code == 2 and "--refine-arg 'epochs': write KEY=VALUE" in err
