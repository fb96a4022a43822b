"""Shared fixtures: paths to ../shared, tiny models built offline from configs."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared CPU spinning
# threads made a stories260K perplexity 10-50x slower (13-35 s instead of 0.5 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture(scope="session")
def stories(stories_path) -> str:
    """stories260K's directory as a command-line argument."""
    return str(stories_path)


@pytest.fixture(scope="session")
def data(shared) -> str:
    """../shared/data as a command-line argument (`--data-dir`)."""
    return str(shared / "data")


# -- the command line in-process -------------------------------------------------------------
def run_cli(capsys, *argv, quiet: bool = True) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `binllm [-q] argv…` run in this process."""
    from binllm.cli import main

    code = main((["-q"] if quiet else []) + [str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def quantize_and_reload(capsys, tmp_path, stories_path, data, *flags) -> tuple[dict, dict]:
    """(quantize's report, eval's report): stories260K quantized by q1_0 with `flags`, saved
    to tmp_path / "q" and evaluated there on tinystories (4 windows of 64), then that saved
    directory evaluated again by `binllm eval` under the same settings."""
    import json

    out, rep, rep2 = tmp_path / "q", tmp_path / "r.json", tmp_path / "e.json"
    common = ["--seqlen", "64", "--max-windows", "4", "--data-dir", data]
    code, _, err = run_cli(capsys, "quantize", str(stories_path), "--method", "q1_0",
                           "--calib", "tinystories", "--nsamples", "4", "--eval", "tinystories",
                           *flags, "--out", str(out), "--report", str(rep), *common)
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", str(out), "--datasets", "tinystories",
                           "--report", str(rep2), *common)
    assert code == 0, err
    return json.loads(rep.read_text()), json.loads(rep2.read_text())


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit code 2; stderr ends with exactly one `binllm: error: …` line (progress bars and
    warnings may precede it) holding every needle, and no traceback. Returns the line."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if "binllm: error" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("binllm: error: ") and err.rstrip().endswith(lines[0])
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def stories_model(stories_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories_path)


def tiny_llama(seed: int = 0):
    """A 2-layer LLaMA built in-process from a config (no download): tiny_causal_lm("llama")."""
    return tiny_causal_lm("llama", seed)


def random_windows(n: int, seqlen: int, seed: int = 0, vocab: int = 256) -> list:
    """n calibration windows (1, seqlen) of uniformly random token ids below `vocab`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(n)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (torchrun's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def correlated(rows: int = 16, cols: int = 96, seed: int = 0):
    """(W (rows, cols), H = 2/n XᵀX (cols, cols)) of 512 correlated inputs X (rank 8 + noise)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, 8, generator=g) @ torch.randn(8, cols, generator=g) \
        + 0.2 * torch.randn(512, cols, generator=g)  # (tokens, cols)
    return torch.randn(rows, cols, generator=g), 2 * X.T @ X / X.shape[0]


@pytest.fixture
def tiny_llama_model():
    return tiny_llama()


# -- tiny models of several families (architecture tests, CLI error cases) -----------------
# hidden 64, 2 layers, vocab 256 unless the caller asks otherwise; every family here keeps
# its decoder linears as nn.Linear (GPT-2's Conv1D is not supported by the walker).
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=256)
TINY_FAMILIES = {
    # family: (config class, model class, extra config kwargs)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(ffn_dim=128, word_embed_proj_dim=64, pad_token_id=1, intermediate_size=None)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict()),
}


def tiny_causal_lm(family: str = "llama", seed: int = 0, vocab_size: int = 256, **overrides):
    """A 2-layer model of `family` (a key of TINY_FAMILIES) built in-process, in eval mode."""
    import transformers

    cfg_name, model_name, extra = TINY_FAMILIES[family]
    kwargs = {**_TINY, **extra, "vocab_size": vocab_size, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_name)(**kwargs)
    return getattr(transformers, model_name)(config).eval()
