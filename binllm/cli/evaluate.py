"""`binllm eval` (perplexity and lm-eval tasks of a model, original or saved), `binllm methods`."""

from __future__ import annotations

from .common import (CLIError, add_common, add_prefill, apply_prefill, csv_list,
                     evaluate_datasets, load_model, print_ppl_table, resolve_seqlen,
                     write_json_atomic)
from .guards import bf16_speed_note
from .lmeval import add_lm_eval_args, check_lm_eval, run_lm_eval


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (and lm-eval tasks) of a model, original or saved")
    p.add_argument("model", help="local model directory, hub id or saved binllm directory")
    p.add_argument("--datasets", default="wikitext2,ptb,c4",
                   help="perplexity datasets ('' for none)")
    add_common(p)
    add_prefill(p)
    add_lm_eval_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    if not csv_list(args.datasets) and not csv_list(args.tasks):
        raise CLIError(f"nothing to do: --datasets {args.datasets!r} names no dataset and no "
                       "--tasks are given; pass e.g. --datasets wikitext2 or --tasks arc_easy")
    task_manager = check_lm_eval(args)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    apply_prefill(model, args)
    slow = bf16_speed_note(getattr(model, "dtype", None), args.device)
    if slow:
        print(f"note: {slow}")
    seqlen = resolve_seqlen(model, args.seqlen)
    model.to(args.device)
    results = evaluate_datasets(model, tokenizer, csv_list(args.datasets), seqlen, args)
    print_ppl_table(results, f"{args.model} (seqlen {seqlen})")
    lm_eval = run_lm_eval(model, tokenizer, args, args.model, task_manager)
    if args.report:
        write_json_atomic(args.report, {"command": "eval", "model": args.model,
                                        "seqlen": seqlen, "prefill": args.prefill,
                                        "perplexity": results,
                                        "lm_eval": lm_eval})
    return 0


def add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list the registered methods and their arguments")
    p.set_defaults(func=cmd_methods)


def cmd_methods(args) -> int:
    from ..methods import METHODS, describe_args

    for name, spec in METHODS.items():
        print(f"{name:<14} {spec.summary}")
        for arg, typ, default in describe_args(spec.cls.Args):
            value = spec.preset.get(arg, default)
            print(f"    {arg:<18} {typ:<40} default {value!r}")
    return 0
