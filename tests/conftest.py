"""Shared fixtures: paths to ../shared, tiny models built offline from configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"


def pytest_configure(config):
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="session")
def stories_path(shared) -> Path:
    return STORIES


@pytest.fixture(scope="session")
def stories_tokenizer(stories_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_path)


@pytest.fixture
def stories_model(stories_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories_path)


def tiny_llama(seed: int = 0):
    """A 2-layer LLaMA built in-process from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llama_model():
    return tiny_llama()
