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
