"""Timed text generation with a loaded model (the `binllm generate` command and benchmarks).

`generate(model, tokenizer, prompt)` continues the prompt (KV cache, greedy or sampled) under
no_grad and returns the text with the wall time of the generation alone: model loading,
kernel-form derivation (done by the loaders) and tokenizer loading are outside it, so a packed
model and its dense original are timed on the same work. `loop` picks what runs the tokens:
`lean` is `binllm.runtime.LeanDecoder` (the model's own modules, a preallocated cache, none of
transformers' generation machinery: the model's logits to round-off, greedy or sampled with
temperature, top-k and top-p as transformers does), `transformers` is `model.generate`, `auto`
(the default) is lean where the model's family is one the loop takes
(`binllm.runtime.unsupported`) and its generation config sets nothing else that changes the
logits (a repetition penalty, banned words, …; `unapplied_settings`), else transformers.
`exact_length` bans the end-of-sequence tokens, as transformers' `min_new_tokens` does. A prompt and
`max_new_tokens` that do not fit the model's context together are refused (ContextError);
an empty prompt starts from the beginning-of-sequence token, and `Generation.note` says so.
`chat` wraps the prompt as one user turn (after an optional system turn) in the tokenizer's
chat template, ready for the assistant's reply, and `Generation.text` is the reply alone.
`streamer` is anything with transformers' streamer interface (`put(ids)`, `end()`, e.g.
`transformers.TextStreamer`): it gets the prompt's ids, then each new token as it is picked.
`Generation` also says when the first new token came (the prompt's forward) and how fast the
single-token steps after it ran (`decode_tokens_per_s`, the rate llama.cpp reports as eval),
noted by a `TokenClock` that hands the tokens on to the streamer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..errors import BinllmError
from ..runtime import lean_generate, unsupported
from .perplexity import ContextError, config_context

LOOPS = ("auto", "lean", "transformers")
# generation-config settings transformers' generate applies and the lean loop does not: always,
# and only when sampling (each with the value that leaves the logits unchanged)
APPLIED_ALWAYS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                  "suppress_tokens": None, "begin_suppress_tokens": None,
                  "sequence_bias": None, "forced_bos_token_id": None,
                  "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
                  "min_length": 0, "min_new_tokens": None}
APPLIED_SAMPLING = {"min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
TOP_K = 50  # transformers' top_k when sampling and the generation config sets none


class EmptyPrompt(BinllmError, ValueError):
    """An empty prompt and a tokenizer with no beginning-of-sequence token to start from."""


class NoChatTemplate(BinllmError, ValueError):
    """Chat asked of a tokenizer that has no chat template (a base model's), or a system
    prompt without chat."""


class LoopError(BinllmError, ValueError):
    """A decode loop that does not exist or cannot run the model, or a bad sampling setting."""


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float  # wall time of the generation: the prompt's forward + every new token
    note: str = ""  # e.g. that an empty prompt started from the beginning-of-sequence token
    loop: str = "transformers"  # what ran the tokens: "lean" or "transformers"
    first_token_s: float = float("nan")  # start to the first new token: the prompt's forward
    decode_s: float = float("nan")  # the first new token to the last: new_tokens - 1 steps

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens/s of the single-token steps after the first new token (llama.cpp's eval
        rate); nan with fewer than two new tokens."""
        if self.new_tokens < 2 or not self.decode_s > 0:
            return float("nan")
        return (self.new_tokens - 1) / self.decode_s


class TokenClock:
    """A streamer (transformers' put / end interface) that notes when each new token arrives
    (the prompt's ids, put first, are not one) and hands everything on to `inner`."""

    def __init__(self, inner: Any = None):
        self.inner, self.times, self.prompt_seen = inner, [], False

    def put(self, value: Any) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def generate(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             device: str = "cpu", exact_length: bool = False, loop: str = "auto",
             chat: bool = False, system: str | None = None,
             streamer: Any = None) -> Generation:
    """Continue `prompt` (chat: answer it as the user's turn, after `system`'s); temperature 0
    is greedy. exact_length: generate exactly max_new_tokens (no stop at the end-of-sequence
    token; for timing). loop, chat, streamer: see the module."""
    import torch

    if system is not None and not chat:
        raise NoChatTemplate("a system prompt needs chat=True (the chat template places it)")
    ids, note = chat_ids(tokenizer, prompt, system) if chat else prompt_ids(tokenizer, prompt)
    check_room(model, ids.shape[1], max_new_tokens)
    ids = ids.to(device)
    if not 0 < top_p <= 1:
        raise LoopError(f"top_p={top_p}: use a probability in (0, 1]")
    loop = pick_loop(model, loop, ids.shape[1] + max_new_tokens, temperature > 0)
    torch.manual_seed(seed)
    clock = TokenClock(streamer)
    if loop == "lean":
        eos = eos_ids(model)
        top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
        gen = torch.Generator(device=ids.device).manual_seed(seed)
        with torch.no_grad():
            start = time.perf_counter()
            out = lean_generate(model, ids, max_new_tokens, temperature=temperature,
                                top_p=top_p, top_k=TOP_K if top_k is None else top_k,
                                eos=None if exact_length else eos,
                                banned=eos if exact_length else None, generator=gen,
                                streamer=clock)
            seconds = time.perf_counter() - start
        return _result(tokenizer, out, ids.shape[1], seconds, note, loop, chat, start, clock)
    sample: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sample = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    if exact_length:
        sample["min_new_tokens"] = max_new_tokens
    pad = tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=pad,
                             attention_mask=torch.ones_like(ids), streamer=clock, **sample)
        seconds = time.perf_counter() - start
    return _result(tokenizer, out, ids.shape[1], seconds, note, loop, chat, start, clock)


def _result(tokenizer: Any, out, n: int, seconds: float, note: str, loop: str, chat: bool,
            start: float, clock: TokenClock) -> Generation:
    """The Generation of out (1, n + new): the whole text, or the reply alone in a chat, and
    when its tokens arrived."""
    text = tokenizer.decode(out[0, n:] if chat else out[0], skip_special_tokens=True)
    t = clock.times
    first = t[0] - start if t else float("nan")
    decode = t[-1] - t[0] if len(t) > 1 else float("nan")
    return Generation(text, n, out.shape[1] - n, seconds, note, loop, first, decode)


def pick_loop(model: Any, loop: str, positions: int, sampling: bool = False) -> str:
    """"lean" or "transformers" for `loop` (auto: lean where the model's family and its
    generation config allow)."""
    if loop not in LOOPS:
        raise LoopError(f"loop={loop!r}: use one of {', '.join(LOOPS)}")
    reason = None
    if loop != "transformers":
        reason = unsupported(model, positions) or unapplied_settings(model, sampling)
    if loop == "lean" and reason:
        raise LoopError(f"the lean decode loop cannot run this model: {reason}; use "
                        "loop='transformers' (or 'auto')")
    return "transformers" if loop == "transformers" or reason else "lean"


def unapplied_settings(model: Any, sampling: bool) -> str | None:
    """The model's generation-config settings that transformers' generate applies to the
    logits and the lean loop does not (None: there are none)."""
    config = getattr(model, "generation_config", None)
    checked = {**APPLIED_ALWAYS, **(APPLIED_SAMPLING if sampling else {})}
    found = [f"{k}={getattr(config, k)!r}" for k, neutral in checked.items()
             if getattr(config, k, None) not in (None, neutral)]
    return f"its generation config sets {', '.join(found)}" if found else None


def eos_ids(model: Any) -> set[int]:
    """The token ids that end generation, as transformers' generate stops on them: the
    model's generation config's end-of-sequence ids."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])}


def prompt_ids(tokenizer: Any, prompt: str):
    """(token ids (1, n), note): the prompt's ids; an empty one gives the beginning-of-sequence
    token alone (the tokenizer's, else its end-of-text token, as GPT-2's tokenizers use it)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, n)
    if prompt and ids.shape[1] > 0:
        return ids, ""
    bos = getattr(tokenizer, "bos_token_id", None)
    bos = getattr(tokenizer, "eos_token_id", None) if bos is None else bos
    if bos is None:
        raise EmptyPrompt("the prompt is empty and the tokenizer has no beginning-of-sequence "
                          "token to start from; pass some text to continue")
    return torch.tensor([[bos]]), ("the prompt is empty: generating from the "
                                   f"beginning-of-sequence token (id {bos})")


def chat_ids(tokenizer: Any, prompt: str, system: str | None = None):
    """(token ids (1, n), note): a conversation of one user turn (after a system turn where
    `system` is given) through the tokenizer's chat template, ending where the assistant's
    reply starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("the tokenizer has no chat template (a base model's tokenizer, "
                             "not a chat model's); drop chat=True to continue the text as it is")
    turns = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    return enc["input_ids"], ""


def check_room(model: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt and max_new_tokens beyond the context the model's config declares."""
    ctx = config_context(getattr(model, "config", None))
    if ctx is None:
        return
    if prompt_tokens >= ctx:
        raise ContextError(f"the prompt is {prompt_tokens} tokens and the model's context is "
                           f"{ctx}: nothing is left to generate; shorten the prompt to fewer "
                           f"than {ctx} tokens")
    if prompt_tokens + max_new_tokens > ctx:
        raise ContextError(f"the prompt ({prompt_tokens} tokens) and max_new_tokens="
                           f"{max_new_tokens} need {prompt_tokens + max_new_tokens} positions, "
                           f"beyond the model's context of {ctx} tokens; use max_new_tokens="
                           f"{ctx - prompt_tokens} or less")
