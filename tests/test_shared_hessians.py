"""One Hessian per input tensor: linears reading the same tensor (q/k/v, gate/up) share an
accumulator, found through the hooks by tensor identity; the H each linear gets is the very
bits of its own accumulator (the oracle: collect_hessians(share=False))."""

from __future__ import annotations

import torch
from torch import nn

from binllm import QuantizeConfig
from binllm.engine.binarize import binarize_model
from binllm.engine.hessian import HessianAccumulator
from binllm.engine.walker import (LayerInputs, capture_layer_inputs, collect_hessians,
                                  find_decoder_layers)
from conftest import tiny_causal_lm


def _layer0_inputs(model, n=3, seqlen=16):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (1, seqlen), generator=g) for _ in range(n)]
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        return layers[0], capture_layer_inputs(model, layers, batches, "cpu")


def test_llama_groups_by_input_and_each_h_equals_its_own_accumulator():
    layer, inputs = _layer0_inputs(tiny_causal_lm("llama"))
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    shared = collect_hessians(layer, inputs, names)
    own = collect_hessians(layer, inputs, names, share=False)
    groups = {}
    for n in names:
        groups.setdefault(id(shared[n]), []).append(n)
    assert sorted(groups.values()) == sorted([names[:3], [names[3]], names[4:6], [names[6]]])
    assert len({id(a) for a in own.values()}) == 7
    for n in names:
        assert shared[n].nsamples == own[n].nsamples == 3
        assert torch.equal(shared[n].H, own[n].H), n


def test_finalize_is_h_in_place_bit_for_bit():
    acc = HessianAccumulator(16)
    acc.add_batch(torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1)))
    want, buf = acc.H, acc.XtX
    got = acc.finalize()
    assert got is buf and torch.equal(got, want) and acc.finalize() is got and acc.H is got


class _Swap(nn.Module):
    """Windows of 5 tokens: a and b read one tensor; longer ones: b reads another."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x if x.shape[1] == 5 else x * 2)


def test_a_grouping_that_breaks_in_a_later_batch_falls_back_to_one_h_per_linear():
    layer = _Swap()
    g = torch.Generator().manual_seed(2)
    inputs = LayerInputs([torch.randn(1, 5 + (i > 0), 4, generator=g) for i in range(3)],
                         [{}] * 3)
    accs = collect_hessians(layer, inputs, ["a", "b"])
    assert accs["a"] is not accs["b"]
    X = torch.cat([h.reshape(-1, 4) for h in inputs.hidden])
    X2 = torch.cat([inputs.hidden[0].reshape(-1, 4)]
                   + [2 * h.reshape(-1, 4) for h in inputs.hidden[1:]])
    torch.testing.assert_close(accs["a"].H, 2 / 3 * X.T @ X)
    torch.testing.assert_close(accs["b"].H, 2 / 3 * X2.T @ X2)


def test_binarize_with_shared_hessians_equals_one_hessian_per_linear(monkeypatch):
    import binllm.engine.binarize as binarize

    def run(share):
        if not share:
            real = binarize.collect_hessians
            monkeypatch.setattr(binarize, "collect_hessians",
                                lambda *a, **k: real(*a, **{**k, "share": False}))
        model = tiny_causal_lm("llama")
        g = torch.Generator().manual_seed(3)
        calib = [torch.randint(0, 256, (1, 16), generator=g) for _ in range(3)]
        report = binarize_model(model, QuantizeConfig("billm"), calib)
        return report, model

    (r1, m1), (r2, m2) = run(True), run(False)
    assert [x.loss for x in r1.linears] == [x.loss for x in r2.linears]
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
