"""The dense model's perplexity with its decoder layers streamed from the shards equals the
in-memory perplexity (same windows, same loss), and no decoder layer stays dense."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from binllm.engine.stream import open_streaming
from binllm.engine.stream_eval import streamed_perplexity
from binllm.evaluation.perplexity import perplexity
from conftest import tiny_causal_lm


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_fp_perplexity_equals_in_memory(tmp_path, family):
    model = tiny_causal_lm(family, num_hidden_layers=3, tie_word_embeddings=False)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "m", max_shard_size="60KB")
    tokens = torch.randint(0, 256, (1, 5 * 24 + 7), generator=torch.Generator().manual_seed(0))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    want = perplexity(dense, tokens, 24, max_windows=4)
    skeleton, ckpt = open_streaming(tmp_path / "m")
    got = streamed_perplexity(skeleton, ckpt, tokens, 24, max_windows=4)
    assert (got.windows, got.total_windows) == (want.windows, want.total_windows) == (4, 5)
    assert got.ppl == want.ppl
    assert all(p.is_meta for p in skeleton.model.layers.parameters())


def test_windows_beyond_the_memory_budget_are_evaluated_in_passes(tmp_path, monkeypatch):
    """max_hidden_bytes of one window: four passes, each reading every layer once; the same
    perplexity bit for bit (every window runs the same layer calls)."""
    from binllm.engine.stream import SafetensorsCheckpoint
    from binllm.engine.stream_eval import windows_per_pass

    model = tiny_causal_lm("llama", num_hidden_layers=3, tie_word_embeddings=False)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "m", max_shard_size="60KB")
    tokens = torch.randint(0, 256, (1, 5 * 24 + 7), generator=torch.Generator().manual_seed(0))
    skeleton, ckpt = open_streaming(tmp_path / "m")
    whole = streamed_perplexity(skeleton, ckpt, tokens, 24, max_windows=4)
    one = 2 * 24 * skeleton.config.hidden_size * 2  # a window's inputs + outputs, bf16
    assert windows_per_pass(skeleton, 24, one) == 1 and windows_per_pass(skeleton, 24, 3 * one) == 3
    reads, steps = [], []
    real = SafetensorsCheckpoint.read
    monkeypatch.setattr(SafetensorsCheckpoint, "read",
                        lambda self, keys: reads.append(keys[0].split(".")[2]) or real(self, keys))
    got = streamed_perplexity(skeleton, ckpt, tokens, 24, max_windows=4, max_hidden_bytes=one,
                              progress=lambda done, n: steps.append((done, n)))
    assert got.ppl == whole.ppl and got.windows == 4
    assert reads == ["0", "1", "2"] * 4
    assert steps == [(k, 12) for k in range(1, 13)]


def test_cli_compare_fp_streams_the_dense_layers_with_the_same_perplexity(
        stories_path, tmp_path, monkeypatch):
    import json

    import binllm.engine.stream_eval as stream_eval
    from binllm.cli import main

    calls = []
    real = stream_eval.streamed_perplexity
    monkeypatch.setattr(stream_eval, "streamed_perplexity",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def fp(name, *extra):
        rep = tmp_path / f"{name}.json"
        assert main(["-q", "quantize", str(stories_path), "--method", "rtn-sign", "--calib",
                     "tinystories", "--nsamples", "2", "--seqlen", "64", "--eval",
                     "tinystories", "--max-windows", "2", "--compare-fp", "--report", str(rep),
                     *extra]) == 0
        report = json.loads(rep.read_text())
        return report["streamed"], report["fp_perplexity"]["tinystories"]

    (s_streamed, s_fp), (m_streamed, m_fp) = fp("s"), fp("m", "--no-stream")
    assert (s_streamed, m_streamed) == (True, False) and len(calls) == 1
    assert s_fp == m_fp


def _binarized(family: str = "llama", **kw):
    """A tiny model whose decoder linears are reference-path BinaryLinears (rtn-sign codes)."""
    from binllm.methods import get_method
    from binllm.engine.reconstruct import reconstruct
    from binllm.packed.layers import BinaryLinear

    model = tiny_causal_lm(family, num_hidden_layers=3, tie_word_embeddings=False, **kw)
    method = get_method("rtn-sign")
    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if isinstance(lin, torch.nn.Linear):
                codes = reconstruct(lin.weight.data.float(), None, method, feedback="none").codes
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent), child,
                        BinaryLinear.from_codes(codes, lin.bias, kernels=False))
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_perplexity_equals_the_whole_model_reference_forward(family):
    from binllm.engine.stream_eval import packed_perplexity

    model = _binarized(family)
    tokens = torch.randint(0, 256, (1, 5 * 24 + 7), generator=torch.Generator().manual_seed(0))
    want = perplexity(model, tokens, 24, max_windows=4)
    got = packed_perplexity(model, tokens, 24, max_windows=4)
    assert (got.windows, got.total_windows) == (want.windows, want.total_windows) == (4, 5)
    assert got.ppl == want.ppl
    assert all(m._dense is None for m in model.modules() if hasattr(m, "hold_dense"))


def test_packed_perplexity_dequantizes_each_linear_once_per_pass(monkeypatch):
    """The whole-model reference forward unpacks every linear at every window; layer by layer,
    each linear is unpacked once per pass of windows (two passes here: max_hidden_bytes)."""
    from binllm.engine.stream_eval import packed_perplexity
    from binllm.packed.layers import BinaryLinear

    model = _binarized()
    tokens = torch.randint(0, 256, (1, 4 * 24), generator=torch.Generator().manual_seed(1))
    n_linears = sum(isinstance(m, BinaryLinear) for m in model.modules())
    calls = []
    real = BinaryLinear.dequantize
    monkeypatch.setattr(BinaryLinear, "dequantize", lambda self: calls.append(1) or real(self))
    perplexity(model, tokens, 24)
    assert len(calls) == 4 * n_linears
    calls.clear()
    two = 2 * 2 * 24 * model.config.hidden_size * 4  # two windows' inputs + outputs, fp32
    packed_perplexity(model, tokens, 24, max_hidden_bytes=two)
    assert len(calls) == 2 * n_linears


def test_evaluate_datasets_takes_the_layerwise_path_for_binarized_models(monkeypatch):
    """The CLI's evaluation of a model with BinaryLinears goes layer by layer; a dense model
    runs whole."""
    import argparse

    import binllm.engine.stream_eval as stream_eval
    import binllm.evaluation.data as data
    from binllm.cli.common import evaluate_datasets
    from binllm.evaluation.data import TextSource

    used = []
    real = stream_eval.packed_perplexity
    monkeypatch.setattr(stream_eval, "packed_perplexity",
                        lambda *a, **k: used.append("packed") or real(*a, **k))
    tokens = torch.randint(0, 256, (1, 3 * 24), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(data, "load_text", lambda *a: TextSource("x", "test", "", (), ""))
    monkeypatch.setattr(data, "eval_tokens", lambda *a: tokens)
    args = argparse.Namespace(eval_split="test", data_dir=None, quiet=True, max_windows=None,
                              device="cpu")
    packed = evaluate_datasets(_binarized(), None, ["x"], 24, args)
    assert used == ["packed"] and packed["x"]["windows"] == 3
    evaluate_datasets(tiny_causal_lm("llama", num_hidden_layers=3), None, ["x"], 24, args)
    assert used == ["packed"]


def test_layerwise_perplexity_refuses_windows_beyond_the_context():
    from binllm.engine.stream_eval import packed_perplexity
    from binllm.evaluation.perplexity import ContextError

    model = _binarized()
    ctx = model.config.max_position_embeddings
    with pytest.raises(ContextError, match=f"context of {ctx} tokens"):
        packed_perplexity(model, torch.zeros(1, 2 * ctx + 2, dtype=torch.long), ctx + 1)
