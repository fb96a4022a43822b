"""`binllm quantize` on a local safetensors checkpoint: stream it layer by layer (the default).

`open_streamed(args)` gives (model skeleton, tokenizer, checkpoint) when MODEL is a local
directory of safetensors shards and `--no-stream` does not ask for the whole model; otherwise
None, and the command loads the model whole as before. The streaming itself is
`binllm.engine.stream`; `--compare-fp` then evaluates the dense model with its layers streamed
too (`fp_streamed`, `binllm.engine.stream_eval`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import BinllmError
from ..packed.output import is_binllm_dir
from .common import CLIError

log = logging.getLogger(__name__)


def add_stream_args(p) -> None:
    p.add_argument("--no-stream", action="store_true",
                   help="load the whole model into memory instead of streaming its layers from "
                        "the safetensors shards (the default for a local safetensors directory)")


class Streamed(NamedTuple):
    """A checkpoint opened for streaming: the model's skeleton, its tokenizer, the shards."""

    model: Any
    tokenizer: Any
    checkpoint: Any  # binllm.engine.stream.SafetensorsCheckpoint


def open_streamed(args, tail: bool = True) -> Streamed | None:
    """(skeleton, tokenizer, checkpoint) for streaming, or None to load the model whole.
    tail False: the final norm and lm_head are read only at the end (`open_streaming`)."""
    from ..engine.stream import NotStreamable, map_large_allocations, open_streaming
    from ..packed.writer import INDEX_FILE, SINGLE_FILE

    local = Path(args.model)
    if args.no_stream or not local.is_dir() or is_binllm_dir(local) or \
            not ((local / SINGLE_FILE).is_file() or (local / INDEX_FILE).is_file()):
        return None
    if not (local / "config.json").is_file():
        raise CLIError(f"{local} has no config.json: it is not a Hugging Face model directory")
    map_large_allocations()  # freed layers go back to the OS (see its docstring)
    try:
        model, ckpt = open_streaming(local, args.dtype, tail=tail)
    except NotStreamable as e:
        log.info("not streaming: %s", e)
        return None
    except BinllmError:
        raise
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load {args.model!r}: {str(e).splitlines()[0]}") from None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(local)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load the tokenizer of {args.model!r}: "
                       f"{str(e).splitlines()[0]}") from None
    return Streamed(model, tokenizer, ckpt)


def fp_streamed(ckpt):
    """evaluate_datasets' perplexity function for the dense layers streamed from `ckpt`."""
    from ..engine.stream_eval import streamed_perplexity

    def ppl(model, tokens, seqlen, *, max_windows=None, device="cpu", progress=None):
        return streamed_perplexity(model, ckpt, tokens, seqlen, max_windows=max_windows,
                                   device=device)
    return ppl
