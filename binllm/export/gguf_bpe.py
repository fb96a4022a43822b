"""The GGUF tokenizer of a byte-level BPE model (GPT-2, SmolLM, Qwen, Llama-3 style): "gpt2".

llama.cpp's BPE tokenizer needs the token strings by id (byte-level: bytes written as GPT-2's
printable characters, "Ġ" for a space), a type per token (1 normal, 3 control, 4 user-defined,
5 unused), the merges in rank order ("a b" strings) and `tokenizer.ggml.pre`, the name of the
pre-tokenizer (the regular expressions that split text before BPE). All of it comes from the
Hugging Face `tokenizer.json`:

- tokens: the BPE vocabulary and the added tokens by id; ids the model has beyond the tokenizer
  are padded as unused `[PAD<id>]` tokens (what llama.cpp's converter writes);
- types: an added token is control when marked special or when it looks special (`<|…|>`),
  user-defined otherwise; every other token is normal;
- pre: named the way llama.cpp's convert_hf_to_gguf.py names it, by a sha256 of the token ids
  the tokenizer gives its check text (`KNOWN_PRE`); a tokenizer whose hash is not listed is
  named from the structure of its pre-tokenizer (`structural_pre`): a lone ByteLevel is
  GPT-2's, Digits(individual) then ByteLevel is SmolLM's. Anything else is refused unless the
  caller names it (`--tokenizer-pre`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .vocab import CONTROL, NORMAL, UNUSED, USER_DEFINED, Vocab, VocabError

# llama.cpp's check text (convert_hf_to_gguf.py `chktxt`): its token ids identify a pre-tokenizer
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) '
              '\U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 '
              '\U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...'
              '3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2'
              '\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e'
              ' ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433'
              '\u0430\u0440\u0441\u043a\u0438 \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve'
              ' been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you l'
              'ike some tea? We\'Ve a\'lL')

# sha256(str(ids of CHECK_TEXT)) → tokenizer.ggml.pre, as llama.cpp's converter lists them
KNOWN_PRE = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai gpt2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM(2)
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
}


def is_byte_level_bpe(tok: dict[str, Any]) -> bool:
    """A BPE model without byte fallback whose pre-tokenizer maps bytes to GPT-2's characters."""
    model = tok.get("model") or {}
    return (model.get("type") == "BPE" and not model.get("byte_fallback")
            and "ByteLevel" in json.dumps(tok.get("pre_tokenizer")))


def bpe_vocab(path: Path, tok: dict[str, Any], vocab_size: int | None = None,
              pre: str | None = None) -> Vocab:
    """The "gpt2" vocabulary of the tokenizer.json `tok` (read from `path`).

    vocab_size: the model's (the embedding's rows); more tokens than that are refused, fewer
    are padded with unused tokens. pre: tokenizer.ggml.pre to write instead of the detected one.
    """
    ids: dict[int, str] = {i: p for p, i in tok["model"]["vocab"].items()}
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    for i, t in added.items():
        ids[i] = t["content"]
    n = max(ids) + 1
    size = n if vocab_size is None else vocab_size
    if n > size:
        raise VocabError(f"{path} has token ids up to {n - 1}, the model's vocabulary only "
                         f"{size} rows; pass the model's own tokenizer")
    tokens, types = [], []
    for i in range(size):
        if i not in ids:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            text = ids[i]
            special = added[i].get("special") or (text.startswith("<|") and text.endswith("|>"))
            tokens.append(text)
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(ids[i])
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    if not merges:
        raise VocabError(f"{path} has no BPE merges; llama.cpp's gpt2 tokenizer needs them")
    return Vocab("gpt2", tokens, types, str(path), merges=merges,
                 pre=pre or pre_tokenizer_name(path, tok), add_bos=adds_bos(tok))


def check_hash(path: Path) -> str | None:
    """sha256 of the token ids the tokenizer gives CHECK_TEXT (None without `tokenizers`)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        ids = Tokenizer.from_file(str(path)).encode(CHECK_TEXT).ids
    except Exception as e:  # the tokenizers library raises its own exception types
        raise VocabError(f"{path} cannot be loaded by the tokenizers library "
                         f"({str(e).splitlines()[0]})") from None
    return hashlib.sha256(str(ids).encode()).hexdigest()


def structural_pre(tok: dict[str, Any]) -> str | None:
    """tokenizer.ggml.pre from the pre-tokenizer's structure, for the shapes known here."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or not byte_level.get("use_regex", True):
        return None
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    return None


def pre_tokenizer_name(path: Path, tok: dict[str, Any]) -> str:
    name = KNOWN_PRE.get(check_hash(path) or "") or structural_pre(tok)
    if name is None:
        shape = json.dumps(tok.get("pre_tokenizer"))[:120]
        raise VocabError(f"{path}: its pre-tokenizer ({shape}) is not one binllm recognizes; "
                         "pass --tokenizer-pre NAME with the name llama.cpp's "
                         "convert_hf_to_gguf.py gives it (e.g. gpt-2, smollm, qwen2, llama-bpe)")
    return name


def adds_bos(tok: dict[str, Any]) -> bool:
    """Whether the tokenizer's post-processor puts a special token before the text."""
    post = tok.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            return bool(single) and "SpecialToken" in single[0]
    return False
