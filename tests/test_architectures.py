"""The walker and binarize_model work generically on several decoder-only families.

Each family is a 2-layer model built offline from its config (conftest.TINY_FAMILIES). The
oracle is a plain forward: `output_hidden_states` gives every decoder layer's input, and a
forward hook on the last layer gives its output (HF's last hidden state is after the final
norm).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from conftest import TINY_FAMILIES, tiny_causal_lm
from torch import nn

import binllm.engine.binarize
from binllm.engine.binarize import binarize_model
from binllm.engine.config import QuantizeConfig
from binllm.methods.base import Method
from binllm.engine.walker import (
    UnsupportedArchitecture,
    find_decoder_layers,
    find_linears,
    run_layer,
    walk_layers,
)

pytestmark = pytest.mark.slow  # spawns processes or runs a large matrix; `-m "not slow"` skips

FAMILIES = sorted(TINY_FAMILIES)
LINEARS_PER_LAYER = {"llama": 7, "mistral": 7, "qwen2": 7, "qwen3": 7, "gemma": 7,
                     "phi3": 4, "opt": 6, "gpt_neox": 4}


def _batches(n=3, batch=2, seqlen=12, vocab=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seqlen), generator=g) for _ in range(n)]


def _plain_forward(model, ids):
    """(inputs of every decoder layer, output of the last one, logits) of a plain forward."""
    _, layers = find_decoder_layers(model)
    last = []
    handle = layers[-1].register_forward_hook(
        lambda mod, args, out: last.append(out[0] if isinstance(out, (tuple, list)) else out))
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    return list(out.hidden_states[:len(layers)]), last[0], out.logits


@dataclass(frozen=True)
class _KeepArgs:
    pass


class _Unchanged:
    """Codes of the no-op method: dequantize() is the weight as it came in."""

    def __init__(self, W):
        self.W = W

    def dequantize(self):
        return self.W

    def paper_bits(self):
        return 32.0

    def stored_bits(self):
        return 32 * self.W.numel()


class KeepWeights(Method):
    """A method that returns every weight unchanged (levels are the weights themselves)."""

    name = "keep"
    Args = _KeepArgs

    def __init__(self, feedback="none", needs_hessian=False):
        super().__init__(_KeepArgs())
        self.feedback, self.needs_hessian = feedback, needs_hessian

    def fit(self, W, ctx):
        return None

    def round(self, W, grid, cols):
        return W.clone()

    def dequantize(self, grid, levels, cols):
        return levels

    def codes(self, grids, levels):
        return _Unchanged(levels)


@pytest.mark.parametrize("family", FAMILIES)
def test_find_decoder_layers_finds_every_layer_and_its_linears(family):
    model = tiny_causal_lm(family)
    path, layers = find_decoder_layers(model)
    assert len(layers) == 2
    assert _get(model, path) is layers
    for layer in layers:
        linears = find_linears(layer)
        assert len(linears) == LINEARS_PER_LAYER[family]
        assert all(isinstance(m, nn.Linear) for m in linears.values())


def _get(model, path):
    for part in path.split("."):
        model = getattr(model, part)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_walk_reproduces_every_layer_of_a_plain_forward(family):
    model = tiny_causal_lm(family)
    batches = _batches()
    expected = [_plain_forward(model, ids)[:2] for ids in batches]  # per batch: (inputs, last)
    seen = []
    for i, _path, layer, inputs in walk_layers(model, batches):
        assert len(inputs.hidden) == len(batches)
        for b, hidden in enumerate(inputs.hidden):
            torch.testing.assert_close(hidden, expected[b][0][i], atol=1e-5, rtol=0)
        if i == 1:  # the last layer: its own output, run with the captured kwargs
            for b, (hidden, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
                with torch.no_grad():
                    out = run_layer(layer, hidden, kw)
                torch.testing.assert_close(out, expected[b][1], atol=1e-5, rtol=0)
        seen.append(i)
    assert seen == [0, 1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,args", [("gptq", {"bits": 8}), ("rtn-sign", {})])
def test_binarize_model_runs_and_quantizes_every_linear(family, method, args):
    model = tiny_causal_lm(family)
    reference = copy.deepcopy(model)
    batches = _batches(n=2, batch=1, seqlen=16)
    report = binarize_model(model, QuantizeConfig(method, args), batches)
    _, layers = find_decoder_layers(model)
    names = [f"{i}.{n}" for i, layer in enumerate(layers) for n in find_linears(layer)]
    assert len(report.linears) == len(names) == 2 * LINEARS_PER_LAYER[family]
    levels = 2 if method == "rtn-sign" else 256
    for layer in layers:
        for linear in find_linears(layer).values():
            W = linear.weight
            assert torch.isfinite(W).all()
            distinct = max(len(torch.unique(row)) for row in W)
            assert distinct <= levels
    with torch.no_grad():
        fp = reference(batches[0]).logits
        q = model(batches[0]).logits
    err = ((q - fp).norm() / fp.norm()).item()
    if method == "gptq":  # 8 bits: logits barely move
        assert err < 0.05
    else:  # one bit per weight: the logits visibly change
        assert err > 0.05


PAPER_METHODS = ["pbllm-10", "billm", "arb", "arb-x", "arb-rc", "arb-llm-x", "arb-llm-rc"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", PAPER_METHODS)
def test_paper_methods_run_on_every_family(family, method):
    """Each paper method binarizes every decoder linear of each family; the weights left in
    the model are exactly its codes' dequantization and the bits are the method's."""
    model = tiny_causal_lm(family)
    batches = _batches(n=2, batch=1, seqlen=16)
    report = binarize_model(model, QuantizeConfig(method), batches)
    path, layers = find_decoder_layers(model)
    linears = {f"{path}.{i}.{n}": m for i, layer in enumerate(layers)
               for n, m in find_linears(layer).items()}
    assert sorted(report.codes) == sorted(linears)
    assert len(linears) == 2 * LINEARS_PER_LAYER[family]
    for name, linear in linears.items():
        W = linear.weight.data
        assert torch.equal(W, report.codes[name].dequantize().to(W.dtype)), name
    low, high = (1.6, 1.8) if method.startswith("pbllm") else (1.0, 2.0)
    assert low < report.paper_bits < high
    with torch.no_grad():
        assert torch.isfinite(model(batches[0]).logits).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("feedback,needs_hessian", [("none", False), ("block", True),
                                                    ("column", False)])
def test_noop_method_leaves_every_layer_output_and_logits_identical(family, feedback,
                                                                    needs_hessian, monkeypatch):
    model = tiny_causal_lm(family)
    reference = copy.deepcopy(model)
    monkeypatch.setattr(binllm.engine.binarize, "get_method",
                        lambda name, args: KeepWeights(feedback, needs_hessian))
    batches = _batches(n=2, batch=2, seqlen=10)
    report = binarize_model(model, QuantizeConfig("gptq"), batches)
    assert len(report.linears) == 2 * LINEARS_PER_LAYER[family]
    for ids in batches:
        got_in, got_last, got_logits = _plain_forward(model, ids)
        want_in, want_last, want_logits = _plain_forward(reference, ids)
        for g, w in zip(got_in + [got_last], want_in + [want_last]):
            assert torch.equal(g, w)
        assert torch.equal(got_logits, want_logits)


def test_gpt2_conv1d_layers_raise_a_clear_error():
    """GPT-2 keeps its projections in Conv1D, not nn.Linear: refuse instead of doing nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256,
                                       n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    assert find_decoder_layers(model)[0] == "transformer.h"
    with pytest.raises(UnsupportedArchitecture, match="nn.Linear"):
        binarize_model(model, QuantizeConfig("rtn-sign"), _batches(n=1, batch=1))
