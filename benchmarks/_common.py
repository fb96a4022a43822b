"""What the benchmark scripts share (benchmarks/ is not a package: a script puts its own folder
on sys.path and imports `_common`).

Paths; the four evaluation datasets of the stories260K protocol; the synthetic 7B-shaped layer
(a random W, the correlated Hessian H = 2/n XᵀX, one `reconstruct` timed and scored by its
relative output error); stories260K calibration and test tokens; greedy decode speed after
the prompt; markdown table rows and the JSON + markdown result files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
DATA = SHARED / "data"
OUT = ROOT / "benchmarks" / "results"
DATASETS = ("tinystories", "wikitext2", "ptb", "c4")
PROMPT = "Once upon a time, there was a little"


# -- the synthetic 7B-shaped layer ---------------------------------------------------------
def synthetic_hessian(d: int, seed: int = 0) -> torch.Tensor:
    """H = 2/n XᵀX (d, d) of correlated activations X = Z·M (n = 2d rows), M = I + G/√d a
    random mixing, as a 7B layer would see."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)  # (d, d)
    Z = torch.randn(2 * d, d, generator=g)  # (n, d)
    X = Z @ M  # (n, d)
    return 2 / X.shape[0] * X.T @ X


def synthetic_weight(out_features: int, in_features: int) -> torch.Tensor:
    """W ~ N(0, 0.02²) of shape (out_features, in_features), seed 1."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(out_features, in_features, generator=g) * 0.02


def relative_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H Eᵀ) / tr(W H Wᵀ), E = W − Q: relative squared error of the layer's outputs."""
    E = W - Q
    return ((E @ H) * E).sum().item() / ((W @ H) * W).sum().item()


def layer_row(label: str, W: torch.Tensor, H: torch.Tensor, method) -> dict:
    """One `reconstruct(W, H, method)`: its seconds, relative output error and bits."""
    from binllm.engine.reconstruct import reconstruct

    t0 = time.perf_counter()
    rec = reconstruct(W, H, method)
    dt = time.perf_counter() - t0
    return {"label": label, "shape": list(W.shape), "seconds": dt,
            "rel_output_error": relative_output_error(W, rec.Q, H),
            "paper_bits": rec.codes.paper_bits(),
            "stored_bits": rec.codes.stored_bits() / W.numel()}


# -- stories260K ---------------------------------------------------------------------------
def stories_inputs(nsamples: int, seqlen: int):
    """(tokenizer, calibration windows of tinystories train (seed 0), tinystories test tokens,
    the token ids of PROMPT) for stories260K."""
    from transformers import AutoTokenizer

    from binllm.evaluation.data import calibration_batches, eval_tokens, load_text

    tok = AutoTokenizer.from_pretrained(STORIES)
    calib = calibration_batches(load_text("tinystories", "train", DATA), tok, nsamples, seqlen, 0)
    test = eval_tokens(load_text("tinystories", "test", DATA), tok, seqlen)
    return tok, calib, test, tok(PROMPT, return_tensors="pt").input_ids


def generation_speed(model, ids: torch.Tensor, new_tokens: int, repeats: int = 3,
                     loop: str = "transformers") -> float:
    """Best tokens/s of greedy decode by transformers' `generate` (loop "transformers") or
    binllm's lean decode loop ("lean"): the time of `new_tokens` decode steps after the
    prompt's forward, as llama.cpp's rows are timed (its prompt evaluated untimed). The prompt
    gives the first token; new_tokens + 1 are generated and the clock runs from the first's
    arrival to the last's, so each timed step is one single-token forward and its pick."""
    from binllm.evaluation.generate import TokenClock
    from binllm.runtime import lean_generate

    assert loop in ("lean", "transformers"), loop
    best = float("inf")
    for _ in range(repeats):
        clock = TokenClock()
        with torch.no_grad():
            if loop == "lean":
                out = lean_generate(model, ids, new_tokens + 1, streamer=clock)
            else:
                out = model.generate(ids, max_new_tokens=new_tokens + 1,
                                     min_new_tokens=new_tokens + 1, do_sample=False,
                                     pad_token_id=0, streamer=clock)
        assert out.shape[1] == ids.shape[1] + new_tokens + 1
        assert len(clock.times) == new_tokens + 1
        best = min(best, clock.times[-1] - clock.times[0])
    return new_tokens / best


# -- results -------------------------------------------------------------------------------
def md_row(*cells) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_results(stem: str, result: dict, markdown: str, out: Path = OUT) -> None:
    """out/STEM.json (the result, indented) and out/STEM.md (the markdown)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown)
