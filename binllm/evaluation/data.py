"""Calibration and evaluation text, joined and tokenized the way GPTQ-style code does it.

| dataset     | local file under the data directory          | join                         |
|-------------|----------------------------------------------|------------------------------|
| wikitext2   | wikitext-2-raw/wiki.{split}.raw (HF rows)    | "\\n\\n" (blank rows are "") |
| ptb         | ptb/ptb.{split}.txt                          | " " over stripped lines      |
| c4          | c4/*.jsonl ({"text": …} per line)            | " ", ≤ 256 × seqlen tokens   |
| tinystories | tinystories/*.txt                            | "\\n" over stripped stories  |
| a path      | any .txt (as is) or .jsonl ("\\n\\n" join)   |                              |

The data directory is `data_dir` (a folder, else a DataError), else $BINLLM_DATA, else ./data,
else ../shared/data.
Where a split is missing locally the loader falls back (train → validation → test) and says
so in the returned `TextSource.note`; with the `datasets` package and network, the hub is
used for named datasets that have no local file at all.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import BinllmError

log = logging.getLogger(__name__)

NAMED = ("wikitext2", "ptb", "c4", "tinystories")
_FALLBACK = {"train": ("train", "validation", "test"), "validation": ("validation", "test"),
             "test": ("test", "validation")}
_SPLIT_FILE = {"train": "train", "validation": "valid", "test": "test"}


class DataError(BinllmError, ValueError):
    """A dataset that cannot be found or is too small for the request."""


@dataclass(frozen=True)
class TextSource:
    name: str
    split: str        # the split actually read
    path: str         # file read (or "hub:…")
    documents: tuple[str, ...]  # c4 and jsonl keep documents for per-document sampling
    text: str         # the joined text
    note: str = ""    # e.g. "train split not available; used validation"


DATA_DIRS = ("data", "../shared/data")  # looked in after data_dir= and $BINLLM_DATA


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory: `explicit` (which must be a folder), else $BINLLM_DATA, ./data,
    ../shared/data, the first that is a folder."""
    if explicit:
        if Path(explicit).is_dir():
            return Path(explicit)
        raise DataError(f"data_dir={explicit} is not a folder; pass a folder laid out like "
                        "../shared/data (wikitext-2-raw/, ptb/, c4/, tinystories/)")
    for cand in (os.environ.get("BINLLM_DATA"), *DATA_DIRS):
        if cand and Path(cand).is_dir():
            return Path(cand)
    raise DataError(f"no data directory found (looked in {looked_in()}); pass data_dir= or set "
                    "BINLLM_DATA to a folder laid out like ../shared/data (wikitext-2-raw/, "
                    "ptb/, c4/, tinystories/)")


def looked_in() -> str:
    """Where data_dir() looks, for messages: $BINLLM_DATA and the default folders, absolute."""
    env = os.environ.get("BINLLM_DATA")
    places = [f"$BINLLM_DATA={env} (not a folder)" if env else "$BINLLM_DATA (not set)"]
    return ", ".join(places + [os.path.abspath(c) for c in DATA_DIRS])


def _named_file(root: Path, name: str, split: str) -> Path | None:
    """The split's own file; for c4 and tinystories a folder's only file serves every split."""
    tag = _SPLIT_FILE[split]
    if name == "wikitext2":
        path = root / "wikitext-2-raw" / f"wiki.{tag}.raw"
    elif name == "ptb":
        path = root / "ptb" / f"ptb.{tag}.txt"
    else:
        folder, ext = root / name, ".jsonl" if name == "c4" else ".txt"
        named = [p for p in sorted(folder.glob(f"*{ext}")) if tag in p.name or split in p.name]
        files = sorted(folder.glob(f"*{ext}"))
        path = named[0] if named else (files[0] if len(files) == 1 else None)
    return path if path is not None and path.is_file() else None


def _read_utf8(path: Path) -> str:
    """The file's text; a binary or non-UTF-8 file is a DataError naming it and the place."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if b"\x00" in raw[:1 << 20]:
        raise DataError(f"{path} is a binary file (it holds NUL bytes); pass a UTF-8 text "
                        ".txt or .jsonl file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                        f"offset {e.start}); convert the file to UTF-8, e.g. "
                        "`iconv -f latin1 -t utf-8`") from None


def _read_jsonl(path: Path) -> list[str]:
    """The "text" field of every non-blank line; a bad line is a DataError with its number."""
    texts = []
    for number, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid JSON ({e.msg}); every line of "
                            'a .jsonl file must be one object such as {"text": "..."}') from None
        if not isinstance(row, dict) or "text" not in row:
            raise DataError(f'{path}, line {number}: no "text" field; every line must be an '
                            'object such as {"text": "..."}')
        if not isinstance(row["text"], str):
            raise DataError(f'{path}, line {number}: "text" is a {type(row["text"]).__name__}, '
                            "not a string")
        texts.append(row["text"])
    return texts


def _join(name: str, path: Path) -> tuple[tuple[str, ...], str]:
    if name == "c4" or path.suffix == ".jsonl":
        docs = tuple(_read_jsonl(path))
        return docs, (" " if name == "c4" else "\n\n").join(docs)
    text = _read_utf8(path)
    if name == "wikitext2":
        lines = text.split("\n")[:-1]
        rows = [line + "\n" if line.strip() else "" for line in lines]  # HF rows
        return (), "\n\n".join(rows)
    if name == "ptb":
        return (), " ".join(line.strip() for line in text.splitlines())
    if name == "tinystories":  # stories separated by <|endoftext|> lines
        stories = text.split("<|endoftext|>")
        return (), "\n".join(s.strip() for s in stories if s.strip())
    return (), text


@dataclass(frozen=True)
class Located:
    """Where `load_text` reads a dataset's split: a local file, or the hub (path None)."""

    path: Path | None
    split: str         # the split read ("file" for a user file)
    note: str = ""     # e.g. "ptb: train split not available locally; used validation"
    missing: str = ""  # with path None: why no local file serves (for the hub's messages)


def locate(name: str, split: str = "test", root: str | os.PathLike | None = None) -> Located:
    """Where `load_text(name, split, root)` reads, without reading it: the checks of a
    dataset name, a user file or a split, made before any work (`binllm compare` runs them
    before its first method). A named dataset that only the hub has needs `datasets`."""
    path = Path(name)
    if name not in NAMED:
        if path.is_dir():
            raise DataError(f"{name} is a folder; pass a .txt or .jsonl file or one of "
                            f"{', '.join(NAMED)}")
        if not path.is_file():
            if "/" in name or os.sep in name or path.suffix:
                raise DataError(f"file {name} does not exist; pass an existing .txt or .jsonl "
                                f"file or one of the named datasets {', '.join(NAMED)}")
            raise DataError(f"unknown dataset {name!r}: use one of {', '.join(NAMED)} "
                            "or the path of a .txt or .jsonl file")
        return Located(path, "file")
    if split not in _FALLBACK:
        raise DataError(f"unknown split {split!r}: use train, validation or test")
    base = data_dir(root) if root or _has_local_dir() else None
    for i, cand in enumerate(_FALLBACK[split]):
        f = _named_file(base, name, cand) if base else None
        if f is not None:
            note = "" if i == 0 else f"{name}: {split} split not available locally; used {cand}"
            if (name in ("c4", "tinystories") and split not in f.name
                    and _SPLIT_FILE[split] not in f.name):
                note = f"{name}: one local file ({f.name}) serves every split"
            return Located(f, cand, note)
    if base is None:
        missing = f"no data directory found (looked in {looked_in()})"
    else:
        missing = (f"{base} holds no file for its {split} split (nor a fallback split: looked "
                   f"for {_expected(base, name, split)})")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError(f"{name}: {missing}, and the `datasets` package is not installed to "
                        "fetch it from the hub; pass data_dir= pointing at a local copy") from None
    return Located(None, split, missing=missing)


def _expected(base: Path, name: str, split: str) -> str:
    tag = _SPLIT_FILE[split]
    return {"wikitext2": f"{base}/wikitext-2-raw/wiki.{tag}.raw",
            "ptb": f"{base}/ptb/ptb.{tag}.txt", "c4": f"{base}/c4/*.jsonl",
            "tinystories": f"{base}/tinystories/*.txt"}[name]


def load_text(name: str, split: str = "test", root: str | os.PathLike | None = None) -> TextSource:
    """The joined text of a named dataset's split, or of a user .txt/.jsonl file."""
    where = locate(name, split, root)
    if where.path is None:
        return _from_hub(name, split, where.missing)
    if where.split == "file":
        docs, text = _join(where.path.suffix, where.path)
        return TextSource(where.path.name, "file", str(where.path), docs, text)
    if where.note:
        log.warning(where.note)
    docs, text = _join(name, where.path)
    return TextSource(name, where.split, str(where.path), docs, text, where.note)


def _has_local_dir() -> bool:
    try:
        data_dir()
        return True
    except DataError:
        return False


def _from_hub(name: str, split: str, missing: str) -> TextSource:
    import datasets

    spec = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", "\n\n"),
            "ptb": ("ptb_text_only", "penn_treebank", "sentence", " "),
            "c4": ("allenai/c4", "en", "text", " "),
            "tinystories": ("roneneldan/TinyStories", None, "text", "\n")}[name]
    try:
        ds = datasets.load_dataset(spec[0], spec[1], split=split)
    except (ConnectionError, OSError) as e:  # offline: the hub cannot be reached
        raise DataError(f"{name}: {missing}, and the hub cannot be reached "
                        f"({type(e).__name__}); pass data_dir= pointing at a local copy"
                        ) from None
    rows = [r.strip() if name == "ptb" else r for r in ds[spec[2]]]
    return TextSource(name, split, f"hub:{spec[0]}", tuple(rows) if name == "c4" else (),
                      spec[3].join(rows))


def tokenize(tokenizer, text: str) -> Tensor:
    """Token ids (1, n) of the whole text as one sequence; special-token strings stay text."""
    try:
        ids = tokenizer(text, return_tensors="pt", split_special_tokens=True,
                        verbose=False).input_ids
    except TypeError:  # tokenizers without the option
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids


def eval_tokens(source: TextSource, tokenizer, seqlen: int) -> Tensor:
    """Evaluation stream (1, n); c4 is truncated to 256 × seqlen tokens as in GPTQ."""
    ids = tokenize(tokenizer, source.text)
    return ids[:, : 256 * seqlen] if source.name == "c4" else ids


def calibration_batches(source: TextSource, tokenizer, nsamples: int, seqlen: int,
                        seed: int = 0) -> list[Tensor]:
    """`nsamples` windows (1, seqlen), seeded with a private random.Random(seed).

    Documents (c4, jsonl) are drawn as GPTQ does: a random document until one is longer than
    seqlen, then a random window inside it. Plain text: a random window of the joined stream.
    """
    rng = random.Random(seed)
    if source.documents:
        docs = [d for d in source.documents if d.strip()]
        long_docs = None
        out = []
        for _ in range(nsamples):
            for _attempt in range(10 * len(docs)):
                ids = tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)])
                if ids.shape[1] > seqlen:
                    break
            else:
                long_docs = False
                break
            start = rng.randint(0, ids.shape[1] - seqlen - 1)
            out.append(ids[:, start:start + seqlen])
        if long_docs is None:
            return out
        log.warning("%s: no document is longer than %d tokens; sampling the joined text",
                    source.name, seqlen)
    ids = tokenize(tokenizer, source.text)
    if ids.shape[1] <= seqlen:
        raise DataError(f"{source.name} ({source.split}) has {ids.shape[1]} tokens, fewer than "
                        f"one calibration window of {seqlen}; use a larger dataset or a "
                        "smaller seqlen=")
    out = []
    for _ in range(nsamples):
        start = rng.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[:, start:start + seqlen])
    return out


def stack(batches: list[Tensor], batch_size: int = 1) -> list[Tensor]:
    """Group (1, seqlen) windows into (batch_size, seqlen) batches."""
    return [torch.cat(batches[i:i + batch_size]) for i in range(0, len(batches), batch_size)]
