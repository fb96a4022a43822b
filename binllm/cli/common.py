"""What every CLI command shares: `CLIError`, argument helpers, the model loader, perplexity tables.

Imports no other CLI module's entry point; the command modules import from here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic  # noqa: F401  (the CLI's reports are written with it)
from .errors import CLIError
from ..packed.output import is_binllm_dir
from .guards import check_model_size

LOAD_DTYPES = ("auto", "float32", "float16", "bfloat16")  # --dtype (auto: the checkpoint's)


def parse_method_args(pairs: list[str], flag: str = "--method-arg",
                      example: str = "bits=3") -> dict[str, str]:
    """KEY=VALUE pairs of a repeatable flag as a dict (values stay strings)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CLIError(f"{flag} {pair!r}: write KEY=VALUE, e.g. {flag} {example}")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def model_context(model) -> int | None:
    """The model's context length in tokens (None when its config does not say)."""
    from ..evaluation.perplexity import config_context

    return config_context(model.config)


def resolve_seqlen(model, seqlen: int | None) -> int:
    ctx = model_context(model)
    if seqlen is None:
        return min(2048, ctx) if ctx else 2048
    check_seqlen(seqlen, ctx)
    return seqlen


def check_seqlen(seqlen: int, ctx: int | None) -> None:
    """--seqlen: at least 2 tokens and within the model's context (when known)."""
    if seqlen < 2:
        raise CLIError(f"--seqlen {seqlen}: use at least 2 tokens")
    if ctx is not None and seqlen > ctx:
        raise CLIError(f"--seqlen {seqlen} exceeds the model's context of {ctx} tokens; "
                       f"use --seqlen {ctx} or less")


def check_model_path(path: str) -> None:
    """MODEL names an existing local model directory or looks like a hub id."""
    local = Path(path)
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not local.exists() and not looks_like_hub_id:
        raise CLIError(f"model {path!r} not found: pass a local model directory or a hub id "
                       "such as meta-llama/Llama-2-7b-hf")
    if local.is_dir() and not (local / "config.json").is_file():
        raise CLIError(f"{path} has no config.json: it is not a Hugging Face model directory")


def load_model(path: str, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) from a local directory or a hub id, with one-line errors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path)
    check_model_path(path)

    from safetensors import SafetensorError

    check_model_size(path, dtype, binllm_dir=is_binllm_dir(local))  # before any allocation
    if is_binllm_dir(local):  # a saved binarized model: packed BinaryLinears via binllm.load
        return load_saved(path, dtype)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as e:
        raise CLIError(f"cannot load {path!r}: {str(e).splitlines()[0]}") from None
    return model, tokenizer


def evaluate_datasets(model, tokenizer, names: list[str], seqlen: int, args,
                      perplexity=None) -> dict[str, Any]:
    """perplexity: the function (model, tokens, seqlen, max_windows=, device=, progress=)
    (default: a model with BinaryLinears layer by layer, each linear dequantized once per
    pass, `binllm.engine.stream_eval.packed_perplexity`; any other model whole,
    `binllm.evaluation.perplexity.perplexity`). Progress counts layers on the layer-wise
    path (every window finishes with the last layer), windows otherwise."""
    from ..evaluation.data import eval_tokens, load_text
    unit = "window"
    if perplexity is None:
        from ..engine.stream_eval import has_binary_linears, packed_perplexity
        from ..evaluation.perplexity import perplexity as whole_model

        layerwise = has_binary_linears(model)
        perplexity = packed_perplexity if layerwise else whole_model
        unit = "layer" if layerwise else unit
    from .progress import Progress

    results = {}
    for name in names:
        source = load_text(name, args.eval_split, args.data_dir)
        tokens = eval_tokens(source, tokenizer, seqlen)
        bar = Progress(f"ppl {name}", unit, quiet=args.quiet, every=None, leave=False)
        res = perplexity(model, tokens, seqlen, max_windows=args.max_windows,
                         device=args.device, progress=bar.update)
        bar.close()
        results[name] = {"ppl": res.ppl, "windows": res.windows,
                         "total_windows": res.total_windows, "split": source.split,
                         "tokens": tokens.numel(), "note": source.note}
    return results


def print_ppl_table(results: dict[str, Any], title: str) -> None:
    if not results:
        return
    print(f"\n{title}")
    print(f"  {'dataset':<12} {'split':<11} {'ppl':>12} {'windows':>12}")
    for name, r in results.items():
        print(f"  {name:<12} {r['split']:<11} {r['ppl']:>12.3f} "
              f"{r['windows']:>5}/{r['total_windows']:<6}")


def csv_list(value: str | None) -> list[str]:
    return [d.strip() for d in (value or "").split(",") if d.strip()]


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1 …")
    p.add_argument("--data-dir", default=None,
                   help="folder laid out like ../shared/data "
                        "(default: $BINLLM_DATA, ./data, ../shared/data)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per window (default: min(2048, context))")
    p.add_argument("--max-windows", type=window_count, default=None, metavar="N|all",
                   help="evaluate only the first N windows of each dataset (quick runs; "
                        "reported); default: all")
    p.add_argument("--eval-split", default="test", choices=["test", "validation"],
                   help="split the perplexities are measured on")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--dtype", default="auto", choices=LOAD_DTYPES,
                   help="load dtype (auto: the checkpoint's)")


def add_prefill(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", default="exact", choices=["exact", "int8"],
                   help="how packed layers compute prompts and perplexity windows on the CPU: "
                        "exact (fp32 sums of the binary weights), or int8 (each prompt "
                        "smoothed per column, its tokens and the rebuilt weight rows rounded "
                        "to 8 bits, int8 GEMMs: faster, approximate); decode stays exact")


def apply_prefill(model, args) -> None:
    """Turn the int8 prefill on in every packed layer where --prefill int8 asks for it, or say
    in one line why it cannot run."""
    if args.prefill == "exact":
        return
    from ..kernels.cpu_int8 import unavailable
    from ..packed.layers import set_int8_prefill

    if not str(args.device).startswith("cpu"):
        raise CLIError(f"--prefill int8 runs on the CPU; drop it for --device {args.device}")
    if getattr(args, "cache_dequantized", False):
        raise CLIError("--prefill int8 computes from the packed bits; drop --cache-dequantized")
    why = unavailable()
    if why:
        raise CLIError(f"--prefill int8 cannot run here: {why}; drop --prefill")
    if not set_int8_prefill(model, True):
        raise CLIError(f"--prefill {args.prefill} applies to the packed layers of a saved "
                       f"binllm model; {args.model} has none (drop --prefill)")


def window_count(value: str) -> int | None:
    """--max-windows: a number, or 'all' (None)."""
    if value.strip().lower() == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: use a number of windows or 'all'"
                                         ) from None


def load_saved(path: str, dtype: str = "auto"):
    """(model, tokenizer) of a binllm directory through binllm.load (clear errors)."""
    import torch
    from transformers import AutoTokenizer

    from ..packed.checkpoint import load_binarized

    model = load_binarized(path, dtype=None if dtype == "auto" else getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
