"""Timed text generation with a loaded model (the `binllm generate` command and benchmarks).

`generate(model, tokenizer, prompt)` runs transformers' `model.generate` (KV cache, greedy or
sampled) under no_grad and returns the text with the wall time of that call alone: model
loading, kernel-form derivation (done by the loaders) and tokenizer loading are outside it, so
a packed model and its dense original are timed on the same work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float  # wall time of model.generate: the prompt's forward + every new token

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def generate(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             device: str = "cpu", exact_length: bool = False) -> Generation:
    """Continue `prompt`; temperature 0 is greedy. exact_length: generate exactly
    max_new_tokens (no stop at the end-of-sequence token; for timing)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    torch.manual_seed(seed)
    sample: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sample = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    if exact_length:
        sample["min_new_tokens"] = max_new_tokens
    pad = tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=pad, **sample)
        seconds = time.perf_counter() - start
    return Generation(tokenizer.decode(out[0], skip_special_tokens=True), ids.shape[1],
                      out.shape[1] - ids.shape[1], seconds)
