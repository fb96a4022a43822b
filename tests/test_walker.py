"""Walker mechanics on the tiny LLaMA: layer discovery, captured inputs and kwargs, Hessian
hooks against a hook-free oracle, state restored, hooks removed. (Other families:
test_architectures.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from binllm.engine.walker import (
    LAYER_PATHS,
    UnsupportedArchitecture,
    calibration_context,
    collect_hessians,
    find_decoder_layers,
    find_linears,
    walk_layers,
)

LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _batches(n=2, batch=2, seqlen=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (batch, seqlen), generator=g) for _ in range(n)]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_find_decoder_layers_uses_no_split_modules(tiny_llama_model):
    path, layers = find_decoder_layers(tiny_llama_model)
    assert path == "model.layers"
    assert layers is tiny_llama_model.model.layers


def test_find_decoder_layers_falls_back_to_the_path_table(tiny_llama_model):
    tiny_llama_model._no_split_modules = None  # an architecture that does not declare it
    path, layers = find_decoder_layers(tiny_llama_model)
    assert path == "model.layers" and path in LAYER_PATHS
    assert layers is tiny_llama_model.model.layers


def test_model_without_decoder_layers_raises_with_advice():
    class Blob(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedArchitecture, match="decoder-only causal LMs"):
        find_decoder_layers(Blob())


def test_find_linears_lists_every_projection_in_registration_order(tiny_llama_model):
    layer = tiny_llama_model.model.layers[0]
    assert list(find_linears(layer)) == LLAMA_LINEARS


def test_noop_walk_matches_hidden_states_with_batches_larger_than_one(tiny_llama_model):
    batches = _batches(n=2, batch=3)
    with torch.no_grad():
        expected = [tiny_llama_model(ids, output_hidden_states=True).hidden_states
                    for ids in batches]
    indices = []
    for i, path, layer, inputs in walk_layers(tiny_llama_model, batches):
        assert path == f"model.layers.{i}"
        assert layer is tiny_llama_model.model.layers[i]
        for b, hidden in enumerate(inputs.hidden):
            assert hidden.shape == (3, 10, 64)
            torch.testing.assert_close(hidden, expected[b][i], atol=1e-5, rtol=0)
        indices.append(i)
    assert indices == [0, 1]


def test_captured_kwargs_carry_position_embeddings_and_no_cache(tiny_llama_model):
    batches = _batches(n=1)
    _, _, _, inputs = next(iter(walk_layers(tiny_llama_model, batches)))
    kw = inputs.kwargs[0]
    cos, sin = kw["position_embeddings"]
    assert cos.shape == sin.shape and cos.shape[-2] == 10  # (1 or batch, seqlen, head_dim)
    assert not {"past_key_value", "past_key_values", "use_cache"} & set(kw)


def test_a_layer_made_identity_passes_its_input_through(tiny_llama_model):
    """The walker re-runs the layer as changed by the consumer to build the next inputs."""
    batches = _batches(n=1)
    seen = []
    for i, _, layer, inputs in walk_layers(tiny_llama_model, batches):
        seen.append(inputs.hidden[0].clone())
        if i == 0:  # zero the residual branches: the layer becomes the identity
            layer.self_attn.o_proj.weight.data.zero_()
            layer.mlp.down_proj.weight.data.zero_()
    assert torch.equal(seen[1], seen[0])


def test_collect_hessians_matches_a_hook_free_oracle(tiny_llama_model):
    """q_proj reads input_layernorm(h); down_proj reads act(gate(x))·up(x), x = post-attn norm."""
    batches = _batches(n=3, batch=2)
    _, _, layer, inputs = next(iter(walk_layers(tiny_llama_model, batches)))
    accs = collect_hessians(layer, inputs, ["self_attn.q_proj", "mlp.down_proj"])
    assert _hooks(layer) == 0
    with torch.no_grad():
        Xq = [layer.input_layernorm(h) for h in inputs.hidden]  # each (2, 10, 64)
        Hq = sum(torch.einsum("btd,bte->de", X, X) for X in Xq) * 2 / 6
    torch.testing.assert_close(accs["self_attn.q_proj"].H, Hq, rtol=1e-4, atol=1e-5)
    assert accs["self_attn.q_proj"].nsamples == 6
    assert accs["mlp.down_proj"].H.shape == (128, 128)


def test_walk_restores_mode_cache_flag_devices_and_removes_hooks(tiny_llama_model):
    model = tiny_llama_model
    model.train()
    model.config.use_cache = True
    hooks_before = _hooks(model)
    for _, _, layer, _ in walk_layers(model, _batches(n=1)):
        assert not model.training and model.config.use_cache is False
        assert not torch.is_grad_enabled()
    assert model.training and model.config.use_cache is True
    assert _hooks(model) == hooks_before
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_breaking_out_of_the_walk_still_restores_the_model(tiny_llama_model):
    model = tiny_llama_model
    model.train()
    walk = walk_layers(model, _batches(n=1))
    next(walk)
    assert not model.training
    walk.close()
    assert model.training


def test_calibration_context_restores_after_an_exception(tiny_llama_model):
    model = tiny_llama_model
    model.train()
    with pytest.raises(RuntimeError):
        with calibration_context(model):
            raise RuntimeError("boom")
    assert model.training and torch.is_grad_enabled()
