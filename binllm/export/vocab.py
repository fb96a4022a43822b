"""What a GGUF vocabulary holds, whatever tokenizer it came from: `Vocab` and its token types.

`gguf_vocab` reads sentencepiece vocabularies (tokenizer.ggml.model "llama") and picks the
reader; `gguf_bpe` reads byte-level BPE ones ("gpt2"). Imports nothing of binllm but errors.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BinllmError

# llama.cpp's token types (gguf TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class VocabError(BinllmError, ValueError):
    """A tokenizer GGUF's vocabularies cannot hold, or a file that is not a tokenizer."""


@dataclass(frozen=True)
class Vocab:
    model: str               # tokenizer.ggml.model: "llama" (sentencepiece) or "gpt2" (BPE)
    tokens: list[str]        # by id
    types: list[int]         # by id: NORMAL, UNKNOWN, CONTROL, …
    source: str              # the file it came from
    scores: list[float] | None = None  # "llama": merge priorities
    merges: list[str] | None = None    # "gpt2": "a b" in rank order
    pre: str | None = None             # "gpt2": tokenizer.ggml.pre
    add_bos: bool | None = None        # what the tokenizer file says, where it says it
