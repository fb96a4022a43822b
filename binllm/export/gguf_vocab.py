"""The GGUF vocabulary of a model directory: llama.cpp's "llama" (sentencepiece) or "gpt2" (BPE).

`read_vocab` picks the source, in this order:

- a tokenizer file given by the caller (`--tokenizer-model`): a sentencepiece model, or a
  Hugging Face `tokenizer.json` (named *.json);
- the directory's sentencepiece `tokenizer.model`;
- the directory's `tokenizer.json`: a Llama-2 style one (BPE with byte fallback and the "▁"
  prepend normalizer, what binllm saves since transformers writes no tokenizer.model) gives
  the sentencepiece vocabulary below; a byte-level BPE one (GPT-2, SmolLM, Qwen, Llama 3) gives
  the "gpt2" vocabulary of `binllm.export.gguf_bpe`. Anything else (WordPiece, Unigram) is
  refused.

llama.cpp's SPM tokenizer needs, per token id, the piece text, a score (merges go to the pair
whose merged piece scores highest) and a type (1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte). A sentencepiece `tokenizer.model` is read as it is; from a Llama-2 style
tokenizer.json the pieces come by id, and since a sentencepiece BPE model scores its normal
pieces −0, −1, −2, … in id order (merged pieces first, single characters after), normal tokens
get −(their rank in id order) and special and byte tokens 0, which reproduces such a model's
scores exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .gguf_bpe import bpe_vocab, is_byte_level_bpe
from .vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Vocab, VocabError

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def read_vocab(model_dir: Path, tokenizer_model: Path | None = None, *,
               vocab_size: int | None = None, pre: str | None = None) -> Vocab:
    """The vocabulary of `model_dir`, or of the tokenizer file `tokenizer_model`.

    vocab_size: the model's vocabulary (a byte-level BPE one is padded to it with unused
    tokens); pre: tokenizer.ggml.pre for a byte-level BPE vocabulary instead of the detected one.
    """
    if tokenizer_model is not None:
        if not tokenizer_model.is_file():
            what = "is a folder" if tokenizer_model.is_dir() else "does not exist"
            raise VocabError(f"--tokenizer-model {tokenizer_model} {what}; pass a sentencepiece "
                             "tokenizer.model or a tokenizer.json file")
        found = tokenizer_model
    elif (model_dir / "tokenizer.model").is_file():
        found = model_dir / "tokenizer.model"
    elif (model_dir / "tokenizer.json").is_file():
        found = model_dir / "tokenizer.json"
    else:
        raise VocabError(f"{model_dir} has neither tokenizer.model nor tokenizer.json; pass "
                         "--tokenizer-model PATH/tokenizer.model (or tokenizer.json)")
    if found.suffix == ".json":
        vocab = _from_tokenizer_json(found, vocab_size, pre)
    else:
        vocab = _from_sentencepiece(found)
    if pre is not None and vocab.model != "gpt2":
        raise VocabError(f"--tokenizer-pre names a byte-level BPE pre-tokenizer; {found} is a "
                         "sentencepiece vocabulary, which has none: drop --tokenizer-pre")
    return vocab


def _from_sentencepiece(path: Path) -> Vocab:
    try:
        import sentencepiece
    except ImportError:
        raise VocabError("reading tokenizer.model needs sentencepiece: "
                         "pip install sentencepiece") from None
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise VocabError(f"{path} is not a sentencepiece model ({str(e).splitlines()[0]}); "
                         "pass the model's own tokenizer.model or tokenizer.json") from None
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i)
                     else UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    return Vocab("llama", tokens, types, str(path), scores=scores)


def _is_llama_spm(tok: dict) -> bool:
    model = tok.get("model") or {}
    norm = json.dumps(tok.get("normalizer"), ensure_ascii=False)
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "▁" in norm


def _from_tokenizer_json(path: Path, vocab_size: int | None, pre: str | None) -> Vocab:
    try:
        tok = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VocabError(f"{path} is not valid JSON ({e}); pass the model's own "
                         "tokenizer.json") from None
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise VocabError(f"{path} is not a Hugging Face tokenizer.json (no model.vocab)")
    if _is_llama_spm(tok):
        return _from_llama_json(path, tok)
    if is_byte_level_bpe(tok):
        return bpe_vocab(path, tok, vocab_size, pre)
    raise VocabError(f"{path} is a {model.get('type')} tokenizer that is neither Llama-2 style "
                     "sentencepiece (BPE with byte fallback and the '▁' normalizer) nor "
                     "byte-level BPE (GPT-2 style); GGUF's vocabularies need one of them: pass "
                     "--tokenizer-model PATH/tokenizer.model")


def _from_llama_json(path: Path, tok: dict) -> Vocab:
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
    return Vocab("llama", pieces, types, str(path), scores=scores)


def special_ids(model_dir: Path, config: dict, vocab: Vocab) -> dict[str, int | bool]:
    """bos / eos / pad / unk ids and add_bos / add_eos, from config.json, tokenizer_config.json
    and the vocabulary (a sentencepiece one adds BOS unless told otherwise, a BPE one as its
    tokenizer.json's post-processor does)."""
    tc_file = model_dir / "tokenizer_config.json"
    try:
        tc = json.loads(tc_file.read_text()) if tc_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        tc = {}
    tc = tc if isinstance(tc, dict) else {}
    out: dict[str, int | bool] = {}
    for key in ("bos", "eos", "pad", "unk"):
        v = config.get(f"{key}_token_id")
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int) and 0 <= v < len(vocab.tokens):
            out[key] = v
    if UNKNOWN in vocab.types:
        out["unk"] = vocab.types.index(UNKNOWN)
    default_bos = vocab.add_bos if vocab.add_bos is not None else vocab.model == "llama"
    out["add_bos"] = bool(tc.get("add_bos_token", default_bos))
    out["add_eos"] = bool(tc.get("add_eos_token", False))
    return out


def chat_template(model_dir: Path) -> str | None:
    """The chat template a Hugging Face directory carries (chat_template.jinja or
    tokenizer_config.json's chat_template), if any."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tc_file = model_dir / "tokenizer_config.json"
    try:
        tc = json.loads(tc_file.read_text()) if tc_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    value = tc.get("chat_template") if isinstance(tc, dict) else None
    return value if isinstance(value, str) else None


__all__ = ["Vocab", "VocabError", "read_vocab", "special_ids", "chat_template", "NORMAL",
           "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE"]
