"""`binllm quantize`: binarize a model, evaluate it, save it packed."""

from __future__ import annotations

import contextlib
from typing import Any

from .common import (CLIError, add_common, csv_list, evaluate_datasets, load_model,
                     parse_method_args, print_ppl_table, resolve_seqlen, write_json_atomic)
from .distributed import add_dist_args, finish, start
from .guards import check_calibration_memory
from .lmeval import add_lm_eval_args, check_lm_eval, run_lm_eval
from .stream import add_stream_args, fp_streamed, open_streamed
from .output import check_model, check_out, lock_out, save_or_keep
from .progress import Progress


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="binarize a model, then evaluate it")
    p.add_argument("model", help="local model directory or hub id")
    p.add_argument("--method", required=True, help="registered method (see `binllm methods`)")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override one method argument, repeatable (`binllm methods` lists them "
                        "with their defaults)")
    p.add_argument("--calib", default="c4", help="calibration dataset name or .txt/.jsonl path")
    p.add_argument("--calib-split", default="train", choices=["train", "validation", "test"],
                   help="split of a named calibration dataset (falls back when missing locally)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window sampling")
    p.add_argument("--block-size", type=int, default=128,
                   help="columns per reconstruction block")
    p.add_argument("--percdamp", type=float, default=0.01,
                   help="Hessian damping as a fraction of its mean diagonal")
    p.add_argument("--feedback", choices=["column", "block", "none"], default=None,
                   help="override the method's error-feedback mode ('none' = no GPTQ compensation)")
    p.add_argument("--refine", choices=["none", "block"], default="none",
                   help="block: after each decoder layer is quantized, train its scales, means "
                        "and latent signs against the full-precision layer (beyond the papers)")
    p.add_argument("--refine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="refinement setting, repeatable: epochs, lr, sign_lr, windows, loss")
    p.add_argument("--rotate", choices=["none", "hadamard"], default="none",
                   help="hadamard: fold the norms and rotate the residual stream by a seeded "
                        "randomized Hadamard matrix before quantizing (loads the model whole)")
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
    add_stream_args(p)
    add_common(p)
    add_lm_eval_args(p)
    add_dist_args(p)
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    """Under torchrun every rank runs this; only rank 0 prints, evaluates and writes."""
    dist = start(args)
    try:
        with contextlib.ExitStack() as stack:  # holds the lock of --out until the end
            return _quantize(args, stack, dist)
    finally:
        finish(dist)


def parse_refine(mode: str, pairs: list[str]):
    """The RefineConfig of --refine/--refine-arg (None for --refine none)."""
    import dataclasses

    from ..engine.config import RefineConfig

    if mode == "none":
        if pairs:
            raise CLIError("--refine-arg needs --refine block")
        return None
    types = {f.name: f.type for f in dataclasses.fields(RefineConfig)}
    values = {}
    for key, value in parse_method_args(pairs).items():
        if key not in types:
            raise CLIError(f"--refine-arg {key}: unknown; use {', '.join(types)}")
        try:
            values[key] = (value if types[key] in (str, "str") else
                           int(value) if types[key] in (int, "int") else float(value))
        except ValueError:
            raise CLIError(f"--refine-arg {key}={value}: not a number") from None
    return RefineConfig(**values)


def _quantize(args, stack: contextlib.ExitStack, dist=None) -> int:
    from ..engine.binarize import binarize_model
    from ..engine.config import QuantizeConfig
    from ..evaluation.data import calibration_batches, load_text
    from ..methods import get_method

    config = QuantizeConfig(method=args.method, method_args=parse_method_args(args.method_arg),
                            block_size=args.block_size, percdamp=args.percdamp,
                            feedback=args.feedback, skip=tuple(csv_list(args.skip)),
                            refine=parse_refine(args.refine, args.refine_arg),
                            rotate=None if args.rotate == "none" else args.rotate)
    method = get_method(config.method, config.method_args)  # fail fast on a bad argument
    if args.nsamples < 1:
        raise CLIError("--nsamples must be at least 1")
    main = dist is None or dist.is_main
    say = print if main else (lambda *a, **k: None)
    task_manager = check_lm_eval(args) if main else None
    if args.out:
        check_out(args)  # every rank refuses a bad --out alike; rank 0 alone locks it
        if main:
            lock_out(args, stack)
    # a local safetensors checkpoint: its layers are streamed (binllm.engine.stream), on every
    # rank under torchrun (each reads its own copy of a layer from the shards)
    eval_names = csv_list(args.eval)
    streamed = None if config.rotate else open_streamed(
        args, tail=main and args.compare_fp and bool(eval_names))
    model, tokenizer = streamed[:2] if streamed else load_model(args.model, args.device,
                                                                args.dtype)
    check_model(args, model)
    if args.out:
        check_out(args, model)  # now with the free space the packed model needs
    seqlen = resolve_seqlen(model, args.seqlen)
    check_calibration_memory(model, args.nsamples, seqlen, args.device,
                             method.needs_hessian or (config.feedback or method.feedback) != "none")
    report: dict[str, Any] = {"command": "quantize", "model": args.model,
                              "streamed": streamed is not None}
    if args.compare_fp and eval_names and main:  # the other ranks wait at their first step
        if streamed:  # the dense layers streamed from the checkpoint, one at a time
            report["fp_perplexity"] = evaluate_datasets(
                model, tokenizer, eval_names, seqlen, args, perplexity=fp_streamed(streamed[2]))
        else:
            model.to(args.device)
            report["fp_perplexity"] = evaluate_datasets(model, tokenizer, eval_names, seqlen,
                                                        args)
            model.to("cpu")
        print_ppl_table(report["fp_perplexity"], "full precision")

    source = load_text(args.calib, args.calib_split, args.data_dir)
    batches = calibration_batches(source, tokenizer, args.nsamples, seqlen, args.seed)
    report["protocol"] = {"calibration": source.name, "calibration_split": source.split,
                          "calibration_note": source.note, "nsamples": args.nsamples,
                          "seqlen": seqlen, "seed": args.seed, "eval_split": args.eval_split,
                          "max_windows": args.max_windows}
    if dist is not None:
        report["protocol"]["processes"] = dist.world
        report["protocol"]["dist_calib"] = dist.calib
    bar = Progress(args.method, "layer", quiet=args.quiet or not main)

    def on_layer(done, total):
        bar.update(done, total)

    from ..engine.journal import LayerJournal, run_identity

    identity = run_identity(model, config, batches)
    journal = None
    if args.resume_dir and main:  # rank 0 reads and writes the journal, shares its layers
        journal = LayerJournal(args.resume_dir, identity)
        journal.verify()  # a damaged layer file stops the run now, with its name
        if journal.layers_done():
            say(f"resuming: {journal.layers_done()} layers restored from {args.resume_dir}")
    if streamed:  # --out is written as the layers finish
        from ..engine.stream import binarize_streaming

        qreport = binarize_streaming(model, streamed[2], config, batches,
                                     out=args.out if main else None, tokenizer=tokenizer,
                                     overwrite=args.overwrite, lock=False, dist=dist,
                                     keep_packed=main and (bool(eval_names)
                                                           or task_manager is not None),
                                     device=args.device, on_layer=on_layer, journal=journal)
    else:
        qreport = binarize_model(model, config, batches, device=args.device, on_layer=on_layer,
                                 journal=journal, dist=dist, checked=True)  # check_model did
    bar.close()
    if not main:
        return 0  # rank 0 evaluates and writes; evaluation runs there alone
    report["quantization"] = qreport.to_dict()
    print(f"\n{args.method}: {len(qreport.linears)} linears in {qreport.seconds:.1f} s, "
          f"peak memory {qreport.peak_memory_mb:.0f} MiB, "
          f"{qreport.paper_bits:.3f} bits/weight as the papers count, "
          f"{qreport.stored_bits:.3f} bits/weight stored")
    if source.note:
        print(f"note: {source.note}")
    if args.out:
        try:
            if not streamed:
                save_or_keep(args, model, qreport, tokenizer, journal, identity)
        except CLIError:
            if args.report:  # keep what was measured
                write_json_atomic(args.report, report)
            raise
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
