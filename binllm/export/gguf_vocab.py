"""The GGUF tokenizer of a Llama-2 style model: llama.cpp's "llama" (sentencepiece) vocabulary.

llama.cpp's SPM tokenizer needs, per token id, the piece text, a score (merges go to the pair
whose merged piece scores highest) and a type (1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte). Two sources, in this order:

- a sentencepiece `tokenizer.model` (given, or in the model directory): read as it is;
- a Hugging Face `tokenizer.json` converted from one (BPE model with byte fallback and the
  "▁" prepend normalizer, what binllm saves since transformers writes no tokenizer.model):
  the pieces by id; a sentencepiece BPE model scores its normal pieces −0, −1, −2, … in id
  order (merged pieces first, single characters after), so normal tokens get −(their rank in
  id order) and special and byte tokens 0, which reproduces such a model's scores exactly.

Anything else (a GPT-2 style byte-level BPE, a WordPiece vocabulary) is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BinllmError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class VocabError(BinllmError, ValueError):
    """A tokenizer the llama vocabulary of GGUF cannot hold."""


@dataclass(frozen=True)
class SpmVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    source: str  # the file it came from


def read_vocab(model_dir: Path, tokenizer_model: Path | None = None) -> SpmVocab:
    """The vocabulary of `model_dir` (or of the sentencepiece file `tokenizer_model`)."""
    spm_file = tokenizer_model or model_dir / "tokenizer.model"
    if tokenizer_model is not None and not spm_file.is_file():
        raise VocabError(f"--tokenizer-model {spm_file} does not exist")
    if spm_file.is_file():
        return _from_sentencepiece(spm_file)
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        return _from_tokenizer_json(tj)
    raise VocabError(f"{model_dir} has neither tokenizer.model nor tokenizer.json; pass "
                     "--tokenizer-model PATH/tokenizer.model")


def _from_sentencepiece(path: Path) -> SpmVocab:
    try:
        import sentencepiece
    except ImportError:
        raise VocabError("reading tokenizer.model needs sentencepiece: "
                         "pip install sentencepiece") from None
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i)
                     else UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    return SpmVocab(tokens, scores, types, str(path))


def _is_llama_spm(tok: dict) -> bool:
    model = tok.get("model") or {}
    norm = json.dumps(tok.get("normalizer"), ensure_ascii=False)
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "▁" in norm


def _from_tokenizer_json(path: Path) -> SpmVocab:
    try:
        tok = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VocabError(f"{path} is not valid JSON ({e})") from None
    if not _is_llama_spm(tok):
        raise VocabError(f"{path} is not a Llama-2 style sentencepiece tokenizer (BPE with byte "
                         "fallback and the '▁' normalizer); GGUF's llama vocabulary needs one: "
                         "pass --tokenizer-model PATH/tokenizer.model")
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    for t in tok.get("added_tokens", []):
        vocab.setdefault(t["content"], t["id"])
    n = max(vocab.values()) + 1
    pieces: list[str | None] = [None] * n
    for piece, i in vocab.items():
        pieces[i] = piece
    if any(p is None for p in pieces):
        raise VocabError(f"{path}: token ids are not contiguous; cannot build a GGUF vocabulary")
    unk = tok["model"].get("unk_token")
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    types = []
    for p in pieces:
        if p == unk:
            types.append(UNKNOWN)
        elif p in added:
            types.append(CONTROL if added[p].get("special") else USER_DEFINED)
        elif _BYTE_PIECE.match(p):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    scores, rank = [], 0
    for t in types:
        scores.append(-float(rank) if t == NORMAL else 0.0)
        rank += t == NORMAL
    return SpmVocab(pieces, scores, types, str(path))


def special_ids(model_dir: Path, config: dict) -> dict[str, int | bool]:
    """bos / eos / unk / pad ids and add_bos / add_eos from config.json and tokenizer_config."""
    tc_file = model_dir / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text()) if tc_file.is_file() else {}
    out: dict[str, int | bool] = {}
    for key in ("bos", "eos", "pad"):
        v = config.get(f"{key}_token_id")
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int):
            out[key] = v
    out["add_bos"] = bool(tc.get("add_bos_token", True))
    out["add_eos"] = bool(tc.get("add_eos_token", False))
    return out
