"""Perplexity with the GPTQ protocol: hand-worked values, window counting, a naive oracle."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from torch import nn

from binllm.evaluation.perplexity import perplexity


class FixedLogits(nn.Module):
    """Returns the same logits row at every position: a fixed next-token distribution."""

    def __init__(self, logits_row: torch.Tensor):
        super().__init__()
        self.register_buffer("row", logits_row)
        self.calls = []

    def forward(self, ids, use_cache=False):
        self.calls.append(tuple(ids.shape))
        logits = self.row.expand(*ids.shape, -1).clone()  # (b, seqlen, vocab)
        return SimpleNamespace(logits=logits)


def uniform(vocab):
    return FixedLogits(torch.zeros(vocab))


@pytest.mark.parametrize("vocab", [2, 37, 256])
def test_uniform_logits_give_perplexity_equal_to_vocab_size(vocab):
    tokens = torch.randint(0, vocab, (1, 1000), generator=torch.Generator().manual_seed(0))
    res = perplexity(uniform(vocab), tokens, seqlen=64)
    assert res.ppl == pytest.approx(vocab, rel=1e-6)


def test_window_count_is_floor_of_tokens_over_seqlen_and_remainder_dropped():
    model = uniform(10)
    res = perplexity(model, torch.zeros(1, 1000, dtype=torch.long), seqlen=64)
    assert (res.windows, res.total_windows, res.seqlen) == (15, 15, 64)  # ⌊1000/64⌋
    assert model.calls == [(1, 64)] * 15


def test_max_windows_is_honoured_and_reported():
    model = uniform(10)
    res = perplexity(model, torch.zeros(1, 1000, dtype=torch.long), seqlen=64, max_windows=4)
    assert (res.windows, res.total_windows) == (4, 15)
    assert len(model.calls) == 4
    res = perplexity(uniform(10), torch.zeros(1, 100, dtype=torch.long), 10, max_windows=50)
    assert (res.windows, res.total_windows) == (10, 10)


def test_hand_worked_fixed_distribution():
    """p = (1/2, 1/4, 1/8, 1/8); windows [0 1 2 3] predict 1, 2, 3: losses ln 4, ln 8, ln 8,
    so ppl = exp((2 + 3 + 3)/3 · ln 2) = 2^(8/3)."""
    model = FixedLogits(torch.tensor([0.5, 0.25, 0.125, 0.125]).log())
    tokens = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 0]])  # the last token is a dropped remainder
    res = perplexity(model, tokens, seqlen=4)
    assert res.windows == 2
    assert res.ppl == pytest.approx(2 ** (8 / 3), rel=1e-6)


def test_mean_is_over_window_losses():
    """exp of the mean of per-window losses: windows predicting 1,1,1 then 3,3,3."""
    model = FixedLogits(torch.tensor([0.5, 0.25, 0.125, 0.125]).log())
    tokens = torch.tensor([[0, 1, 1, 1, 0, 3, 3, 3]])
    res = perplexity(model, tokens, seqlen=4)
    assert res.ppl == pytest.approx(math.exp((math.log(4) + math.log(8)) / 2), rel=1e-6)


def test_tiny_llama_matches_a_naive_window_loop():
    model = tiny_llama()
    tokens = torch.randint(0, 256, (1, 5 * 32 + 7), generator=torch.Generator().manual_seed(1))
    losses = []
    with torch.no_grad():
        for w in range(5):
            ids = tokens[0, w * 32:(w + 1) * 32]
            logp = F.log_softmax(model(ids[None]).logits[0].double(), dim=-1)  # (32, vocab)
            nll = -logp[torch.arange(31), ids[1:]]  # position t predicts token t + 1
            losses.append(nll.mean().item())
    expected = math.exp(sum(losses) / 5)
    assert perplexity(model, tokens, 32).ppl == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tokens, 32, batch_size=2).ppl == pytest.approx(expected, rel=1e-5)


def test_progress_callback_and_training_mode_restored():
    model = uniform(5)
    model.train()
    seen = []
    perplexity(model, torch.zeros(1, 50, dtype=torch.long), 10, batch_size=2,
               progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert model.training


def test_too_few_tokens_raise_with_advice():
    with pytest.raises(ValueError, match="smaller seqlen="):
        perplexity(uniform(5), torch.zeros(1, 9, dtype=torch.long), 10)


# -- windows beyond the model's context --------------------------------------------------------
def test_perplexity_and_binarize_model_refuse_a_seqlen_beyond_the_context(monkeypatch):
    """As the CLI's --seqlen check: the library names seqlen= and the limit, before any work."""
    from binllm import QuantizeConfig, binarize_model
    from binllm.engine import binarize
    from binllm.evaluation.perplexity import ContextError

    model = tiny_llama()
    ctx = model.config.max_position_embeddings
    tokens = torch.zeros(1, 4 * (ctx + 1), dtype=torch.long)
    with pytest.raises(ContextError, match=f"seqlen={ctx + 1} exceeds the model's context of "
                                           f"{ctx} tokens; use seqlen={ctx} or less"):
        perplexity(model, tokens, ctx + 1)
    assert perplexity(model, tokens, ctx, max_windows=1).windows == 1  # the limit itself runs

    def never(*a, **k):
        raise AssertionError("a layer was walked before the refusal")

    monkeypatch.setattr(binarize, "walk_layers", never)
    with pytest.raises(ContextError, match=f"seqlen={ctx + 1} exceeds"):
        binarize_model(model, QuantizeConfig("rtn-sign"), [tokens[:, :ctx + 1]])
