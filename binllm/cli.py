"""Command line: `binllm quantize | eval | methods | …`. Parses, calls the library, prints.

Each subcommand is an `add_<name>(subparsers)` function that registers its parser and sets
`func`; the library does the work and returns report objects, this module prints tables,
shows progress bars and writes files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .cli_lmeval import add_lm_eval_args, check_lm_eval, run_lm_eval

log = logging.getLogger("binllm")


class CLIError(Exception):
    """A user error the CLI reports in one line."""


# -- helpers -------------------------------------------------------------------------------
def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temp file beside `path`, then rename: never a half-written report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_method_args(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CLIError(f"--method-arg {pair!r}: write KEY=VALUE, e.g. --method-arg bits=3")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def model_context(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def resolve_seqlen(model, seqlen: int | None) -> int:
    ctx = model_context(model)
    if seqlen is None:
        return min(2048, ctx) if ctx else 2048
    if seqlen < 2:
        raise CLIError(f"--seqlen {seqlen}: use at least 2 tokens")
    if ctx is not None and seqlen > ctx:
        raise CLIError(f"--seqlen {seqlen} exceeds the model's context of {ctx} tokens; "
                       f"use --seqlen {ctx} or less")
    return seqlen


def load_model(path: str, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) from a local directory or a hub id, with one-line errors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path)
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not local.exists() and not looks_like_hub_id:
        raise CLIError(f"model {path!r} not found: pass a local model directory or a hub id "
                       "such as meta-llama/Llama-2-7b-hf")
    if local.is_dir() and not (local / "config.json").is_file():
        raise CLIError(f"{path} has no config.json: it is not a Hugging Face model directory")
    from .cli_packed import is_binllm_dir, load_saved

    if is_binllm_dir(local):  # a saved binarized model: packed BinaryLinears via binllm.load
        return load_saved(path, dtype)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load {path!r}: {str(e).splitlines()[0]}") from None
    return model, tokenizer


def evaluate_datasets(model, tokenizer, names: list[str], seqlen: int, args) -> dict[str, Any]:
    from tqdm import tqdm

    from .data import eval_tokens, load_text
    from .evaluate import perplexity

    results = {}
    for name in names:
        source = load_text(name, args.eval_split, args.data_dir)
        tokens = eval_tokens(source, tokenizer, seqlen)
        bar = tqdm(desc=f"ppl {name}", unit="win", leave=False, disable=args.quiet)

        def progress(done, total, bar=bar):
            bar.total = total
            bar.n = done
            bar.refresh()

        res = perplexity(model, tokens, seqlen, max_windows=args.max_windows,
                         device=args.device, progress=progress)
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


def _datasets(value: str | None) -> list[str]:
    return [d.strip() for d in (value or "").split(",") if d.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1 …")
    p.add_argument("--data-dir", default=None,
                   help="folder laid out like ../shared/data "
                        "(default: $BINLLM_DATA, ./data, ../shared/data)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per window (default: min(2048, context))")
    p.add_argument("--max-windows", type=int, default=None,
                   help="evaluate only the first N windows of each dataset (quick runs; reported)")
    p.add_argument("--eval-split", default="test", choices=["test", "validation"])
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--dtype", default="auto", help="load dtype: auto, float32, float16, bfloat16")


# -- subcommands ---------------------------------------------------------------------------
def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="binarize a model, then evaluate it")
    p.add_argument("model", help="local model directory or hub id")
    p.add_argument("--method", required=True, help="registered method (see `binllm methods`)")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--calib", default="c4", help="calibration dataset name or .txt/.jsonl path")
    p.add_argument("--calib-split", default="train", choices=["train", "validation", "test"])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--feedback", choices=["column", "block", "none"], default=None,
                   help="override the method's error-feedback mode ('none' = no GPTQ compensation)")
    p.add_argument("--skip", default="",
                   help="comma-separated linear names to leave alone (e.g. down_proj)")
    p.add_argument("--eval", default="wikitext2,ptb,c4",
                   help="comma-separated datasets ('' for none)")
    p.add_argument("--compare-fp", action="store_true", help="also evaluate the unquantized model")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="save the binarized model here (packed HF directory, see `binllm inspect`)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--resume-dir", default=None, metavar="DIR",
                   help="keep every finished layer here; rerunning the same command resumes")
    _add_common(p)
    add_lm_eval_args(p)
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from tqdm import tqdm

    from .binarize import binarize_model
    from .config import QuantizeConfig
    from .data import calibration_batches, load_text
    from .methods import get_method

    config = QuantizeConfig(method=args.method, method_args=parse_method_args(args.method_arg),
                            block_size=args.block_size, percdamp=args.percdamp,
                            feedback=args.feedback, skip=tuple(_datasets(args.skip)))
    get_method(config.method, config.method_args)  # fail fast on a bad method or argument
    if args.nsamples < 1:
        raise CLIError("--nsamples must be at least 1")
    task_manager = check_lm_eval(args)
    if args.out and Path(args.out).exists() and not args.overwrite and \
            (not Path(args.out).is_dir() or any(Path(args.out).iterdir())):
        raise CLIError(f"--out {args.out} exists and is not empty; "
                       "pass --overwrite or another --out")
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    seqlen = resolve_seqlen(model, args.seqlen)
    eval_names = _datasets(args.eval)
    report: dict[str, Any] = {"command": "quantize", "model": args.model}
    if args.compare_fp and eval_names:
        model.to(args.device)
        report["fp_perplexity"] = evaluate_datasets(model, tokenizer, eval_names, seqlen, args)
        model.to("cpu")
        print_ppl_table(report["fp_perplexity"], "full precision")

    source = load_text(args.calib, args.calib_split, args.data_dir)
    batches = calibration_batches(source, tokenizer, args.nsamples, seqlen, args.seed)
    report["protocol"] = {"calibration": source.name, "calibration_split": source.split,
                          "calibration_note": source.note, "nsamples": args.nsamples,
                          "seqlen": seqlen, "seed": args.seed, "eval_split": args.eval_split,
                          "max_windows": args.max_windows}
    bar = tqdm(desc=f"{args.method}", unit="layer", disable=args.quiet)

    def on_layer(done, total):
        bar.total = total
        bar.update(done - bar.n)

    journal = None
    if args.resume_dir:
        from .journal import LayerJournal, run_identity

        journal = LayerJournal(args.resume_dir, run_identity(model, config, batches))
        if journal.layers_done():
            print(f"resuming: {journal.layers_done()} layers restored from {args.resume_dir}")
    qreport = binarize_model(model, config, batches, device=args.device, on_layer=on_layer,
                             journal=journal)
    bar.close()
    report["quantization"] = qreport.to_dict()
    print(f"\n{args.method}: {len(qreport.linears)} linears in {qreport.seconds:.1f} s, "
          f"peak memory {qreport.peak_memory_mb:.0f} MiB, "
          f"{qreport.paper_bits:.3f} bits/weight as the papers count, "
          f"{qreport.stored_bits:.3f} bits/weight stored")
    if source.note:
        print(f"note: {source.note}")
    if args.out:
        from .checkpoint import save_binarized

        save_binarized(model.to("cpu"), qreport, tokenizer, args.out, overwrite=args.overwrite)
        report["out"] = args.out
        print(f"model saved to {args.out} (see `binllm inspect {args.out}`)")
    if eval_names:
        model.to(args.device)
        report["perplexity"] = evaluate_datasets(model, tokenizer, eval_names, seqlen, args)
        print_ppl_table(report["perplexity"], f"{args.method} (seqlen {seqlen})")
    if task_manager is not None:
        model.to(args.device)
        try:
            report["lm_eval"] = run_lm_eval(model, tokenizer, args, args.method, task_manager)
        except CLIError:
            if args.report:  # keep what was measured
                write_json_atomic(args.report, report)
            raise
    if args.report:
        write_json_atomic(args.report, report)
        print(f"report written to {args.report}")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (and lm-eval tasks) of a model, original or saved")
    p.add_argument("model")
    p.add_argument("--datasets", default="wikitext2,ptb,c4",
                   help="perplexity datasets ('' for none)")
    _add_common(p)
    add_lm_eval_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    task_manager = check_lm_eval(args)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    seqlen = resolve_seqlen(model, args.seqlen)
    model.to(args.device)
    results = evaluate_datasets(model, tokenizer, _datasets(args.datasets), seqlen, args)
    print_ppl_table(results, f"{args.model} (seqlen {seqlen})")
    lm_eval = run_lm_eval(model, tokenizer, args, args.model, task_manager)
    if args.report:
        write_json_atomic(args.report, {"command": "eval", "model": args.model,
                                        "seqlen": seqlen, "perplexity": results,
                                        "lm_eval": lm_eval})
    return 0


def add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list the registered methods and their arguments")
    p.set_defaults(func=cmd_methods)


def cmd_methods(args) -> int:
    from .methods import METHODS, describe_args

    for name, spec in METHODS.items():
        print(f"{name:<14} {spec.summary}")
        for arg, typ, default in describe_args(spec.cls.Args):
            value = spec.preset.get(arg, default)
            print(f"    {arg:<18} {typ:<40} default {value!r}")
    return 0


from .cli_packed import add_generate, add_inspect  # noqa: E402
from .cli_qat import add_qat  # noqa: E402

COMMANDS = (add_quantize, add_eval, add_methods, add_qat, add_inspect, add_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binllm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log every linear")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .binarize import NonFiniteWeights
    from .data import DataError
    from .hessian import HessianNotPositiveDefinite
    from .journal import JournalMismatch
    from .methods import MethodArgumentError
    from .packing import PackingError
    from .saved_dir import CheckpointError
    from .walker import UnsupportedArchitecture

    known = (CLIError, DataError, MethodArgumentError, UnsupportedArchitecture,
             NonFiniteWeights, HessianNotPositiveDefinite, CheckpointError, PackingError,
             JournalMismatch)
    start = time.perf_counter()
    try:
        code = args.func(args)
    except known as e:
        print(f"binllm: error: {e}", file=sys.stderr)
        return 2
    log.info("done in %.1f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
