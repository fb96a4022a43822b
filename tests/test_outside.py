"""Embeddings and lm_head outside the decoder layers: q8 / q4 codes, a tied table stored once,
the lookup unpacking only its rows, and the saved model computing what the quantized one did."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from binllm.engine.config import ConfigError, QuantizeConfig
from binllm.engine.outside import quantize_outside, rtn_uniform
from binllm.packed.embedding import PackedEmbedding, TiedHead
from binllm.packed.layers import BinaryLinear
from conftest import tiny_causal_lm


def test_rtn_uniform_rounds_each_group_to_its_grid():
    """Naive oracle: per row and group of 32, min–max grid of 2^bits levels; every weight
    within half a step of its level; 4.625 / 8.75 stored bits per weight (fp16 scale,
    integer zero per group)."""
    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(0))
    for bits, stored in ((4, 4.625), (8, 8.75)):
        codes = rtn_uniform(W, bits)
        Q = codes.dequantize()
        g = W.view(40, 3, 32)
        step = (g.amax(-1) - g.amin(-1)) / (2 ** bits - 1)  # (40, 3)
        err = (W - Q).view(40, 3, 32).abs()
        assert bool((err <= step.unsqueeze(-1) * 0.5 + 1e-3).all())
        assert codes.stored_bits() / W.numel() == pytest.approx(stored)


def test_tied_table_quantized_once_lookup_and_head_use_the_same_codes():
    model = tiny_causal_lm("llama", num_hidden_layers=2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    E = model.model.embed_tokens.weight.detach().clone()
    report = quantize_outside(model, "q4", "q4")
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, PackedEmbedding) and isinstance(head, TiedHead) and report.tied
    assert head.table is emb and not any("lm_head" in k for k in model.state_dict())
    Eq = rtn_uniform(E, 4).dequantize()
    ids = torch.tensor([[3, 7, 3, 255, 0]])
    assert torch.equal(emb(ids), Eq[ids].to(emb.dtype))
    x = torch.randn(1, 20, E.shape[1])  # 20 tokens: the dense path
    assert torch.equal(head(x), F.linear(x, Eq))
    x1 = torch.randn(1, 1, E.shape[1])  # decode: the kernels, to fp32 round-off
    torch.testing.assert_close(head(x1), F.linear(x1, Eq), rtol=1e-4, atol=1e-4)
    assert model.config.tie_word_embeddings is False  # the TiedHead ties them now


def test_tied_table_with_two_options_is_untied_each_in_its_type():
    model = tiny_causal_lm("llama", num_hidden_layers=2, tie_word_embeddings=True)
    E = model.model.embed_tokens.weight.detach().clone()
    report = quantize_outside(model, "keep", "q8")
    assert not report.tied and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert isinstance(model.lm_head, BinaryLinear)
    assert torch.equal(model.model.embed_tokens.weight, E)
    assert torch.equal(model.lm_head.dequantize(), rtn_uniform(E, 8).dequantize())


def test_lookup_unpacks_only_the_rows_it_needs(monkeypatch):
    """A uniform table's rows are read from the packed bytes: dequantize() is never called, and
    the rows equal the table's; an odd width falls back to the whole table."""
    E = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    emb = PackedEmbedding.from_codes_like(rtn_uniform(E, 4), torch.nn.Embedding(50, 64))
    full = emb.dequantize()
    monkeypatch.setattr(PackedEmbedding, "dequantize", lambda self: pytest.fail("unpacked all"))
    ids = torch.tensor([[49, 0, 17], [17, 17, 2]])
    assert torch.equal(emb(ids), full[ids])
    one = torch.tensor([[17]])  # a decode step: its one row
    assert emb(one).shape == (1, 1, 64) and torch.equal(emb(one), full[one])
    monkeypatch.undo()
    odd = PackedEmbedding.from_codes_like(rtn_uniform(E[:, :33], 4), torch.nn.Embedding(50, 33))
    assert torch.equal(odd(ids), odd.dequantize()[ids])


def test_options_are_checked():
    with pytest.raises(ConfigError, match="embeddings='q3'"):
        QuantizeConfig(method="rtn-sign", embeddings="q3")
    with pytest.raises(ConfigError, match="lm_head='int4'"):
        quantize_outside(tiny_causal_lm("llama", num_hidden_layers=1), "keep", "int4")
    assert "embeddings" not in QuantizeConfig(method="rtn-sign").to_dict()  # plain run unchanged


@pytest.mark.parametrize("stream", [True, False])
def test_saved_model_stores_the_tied_table_once_and_computes_the_same(
        stories_path, tmp_path, stream, monkeypatch):
    import binllm
    from binllm.cli import main

    monkeypatch.setenv("BINLLM_DATA", str(stories_path.parents[1] / "data"))
    out, rep = tmp_path / "q", tmp_path / "r.json"
    argv = ["-q", "quantize", str(stories_path), "--method", "rtn-sign", "--calib",
            "tinystories", "--nsamples", "2", "--seqlen", "64", "--eval", "tinystories",
            "--max-windows", "2", "--embeddings", "q4", "--lm-head", "q4", "--out", str(out),
            "--report", str(rep)] + ([] if stream else ["--no-stream"])
    assert main(argv) == 0
    report = json.loads(rep.read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["tied_heads"] == {"lm_head": "model.embed_tokens"}
    assert cfg["tie_word_embeddings"] is False
    outside = report["quantization"]["outside"]
    assert outside["tied"] and "model.embed_tokens" in outside["stored_bits"]
    model = binllm.load(out, kernels=False)
    assert isinstance(model.lm_head, TiedHead) and model.lm_head.table is model.model.embed_tokens
    header = json.loads((out / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (out / "model.safetensors").read_bytes()[:8], "little")])
    assert not any(k.startswith("lm_head") for k in header) and "model.embed_tokens.q" in header
    from binllm.evaluation.data import eval_tokens, load_text
    from binllm.evaluation.perplexity import perplexity
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    tokens = eval_tokens(load_text("tinystories", "test", None), tok, 64)
    ppl = perplexity(model, tokens, 64, max_windows=2).ppl
    assert ppl == pytest.approx(report["perplexity"]["tinystories"]["ppl"], rel=1e-6)


def test_layerwise_evaluation_unpacks_the_tied_table_once_per_pass(monkeypatch):
    """The whole-model forward dequantizes the table at every window (prompt-sized inputs go
    the dense way); layer by layer, the tail holds it once, with the same perplexity."""
    from binllm.engine.stream_eval import packed_perplexity
    from binllm.evaluation.perplexity import perplexity

    model = tiny_causal_lm("llama", num_hidden_layers=2, tie_word_embeddings=True).eval()
    quantize_outside(model, "q8", "q8")
    tokens = torch.randint(0, 256, (1, 4 * 24), generator=torch.Generator().manual_seed(3))
    calls = []
    real = PackedEmbedding.dequantize
    monkeypatch.setattr(PackedEmbedding, "dequantize", lambda self: calls.append(1) or real(self))
    want = perplexity(model, tokens, 24)
    assert len(calls) == 4
    calls.clear()
    got = packed_perplexity(model, tokens, 24)
    assert len(calls) == 1 and got.ppl == want.ppl
    assert model.model.embed_tokens._dense is None  # released after the pass
