"""`binllm quantize`: binarize a model, evaluate it, save it packed."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from .common import (CLIError, add_common, csv_list, evaluate_datasets, load_model,
                     parse_method_args, print_ppl_table, resolve_seqlen, write_json_atomic)
from .distributed import add_dist_args, finish, start
from .guards import bf16_speed_note, check_calibration_memory
from .lmeval import add_lm_eval_args, check_lm_eval, run_lm_eval
from .stream import Streamed, add_stream_args, fp_streamed, open_streamed
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
    p.add_argument("--distill", choices=["none", "logits"], default="none",
                   help="logits: once every layer is quantized, train all scales and means "
                        "against the full-precision model's next-token distribution on the "
                        "calibration windows (beyond the papers; loads the model whole)")
    p.add_argument("--distill-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="distillation setting, repeatable: epochs, lr, sign_lr, topk, windows, "
                        "autocast, data (calib|sampled|both), sample_len, sample_windows")
    p.add_argument("--rotate", choices=["none", "hadamard"], default="none",
                   help="hadamard: fold the norms and rotate the residual stream by a seeded "
                        "randomized Hadamard matrix before quantizing (loads the model whole)")
    for flag, what in (("--embeddings", "the input embedding table"),
                       ("--lm-head", "the output layer")):
        p.add_argument(flag, choices=["keep", "q8", "q4"], default="keep",
                       help=f"{what}: keep as loaded, or round to 8 / 4 bits per weight (groups "
                            "of 32, fp16 scales; a tied table with one option is stored once)")
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
    from ..engine.config import RefineConfig

    return _stage_config(RefineConfig, "--refine", "block", mode, pairs)


def parse_distill(mode: str, pairs: list[str]):
    """The DistillConfig of --distill/--distill-arg (None for --distill none)."""
    from ..engine.config import DistillConfig

    return _stage_config(DistillConfig, "--distill", "logits", mode, pairs)


def _stage_config(cls, flag: str, on: str, mode: str, pairs: list[str]):
    """cls(**settings) of an optional stage's flag and its `FLAG-arg KEY=VALUE` pairs."""
    import dataclasses

    if mode == "none":
        if pairs:
            raise CLIError(f"{flag}-arg needs {flag} {on}")
        return None
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {}
    for key, value in parse_method_args(pairs, f"{flag}-arg", "epochs=4").items():
        if key not in types:
            raise CLIError(f"{flag}-arg {key}: unknown; use {', '.join(types)}")
        try:
            values[key] = (value if types[key] in (str, "str") else
                           int(value) if types[key] in (int, "int") else float(value))
        except ValueError:
            raise CLIError(f"{flag}-arg {key}={value}: not a number") from None
    return cls(**values)


@dataclass
class _Run:
    """One `binllm quantize` run: what its phases share."""

    args: Any
    dist: Any                       # Distributed under torchrun, else None
    config: Any                     # QuantizeConfig
    method: Any
    report: dict[str, Any] = field(default_factory=dict)  # the JSON report, filled by phases
    streamed: Streamed | None = None
    model: Any = None
    tokenizer: Any = None

    @property
    def main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def eval_names(self) -> list[str]:
        return csv_list(self.args.eval)

    @contextlib.contextmanager
    def keeping_report(self):
        """On a CLIError, write what was measured to --report before it propagates."""
        try:
            yield
        except CLIError:
            if self.args.report:
                write_json_atomic(self.args.report, self.report)
            raise


def _quantize(args, stack: contextlib.ExitStack, dist=None) -> int:
    run = _configure(args, dist)
    task_manager = check_lm_eval(args) if run.main else None
    if args.out:
        check_out(args)  # every rank refuses a bad --out alike; rank 0 alone locks it
        if run.main:
            lock_out(args, stack)
    _open_model(run)
    slow = run.main and bf16_speed_note(getattr(run.model, "dtype", None), args.device)
    if slow:
        print(f"note: {slow}")
    seqlen = resolve_seqlen(run.model, args.seqlen)
    check_calibration_memory(run.model, args.nsamples, seqlen, args.device,
                             run.method.uses_hessian(run.config.feedback))
    run.report.update(command="quantize", model=args.model, streamed=run.streamed is not None)
    if args.compare_fp and run.eval_names and run.main:  # the other ranks wait at their first step
        _fp_perplexity(run, seqlen)
    batches, note = _calibration(run, seqlen)
    qreport, journal, identity = _binarize(run, batches, keep_packed=bool(run.eval_names)
                                           or task_manager is not None)
    if not run.main:
        return 0  # rank 0 evaluates and writes; evaluation runs there alone
    run.report["quantization"] = qreport.to_dict()
    print(f"\n{args.method}: {len(qreport.linears)} linears in {qreport.seconds:.1f} s, "
          f"peak memory {qreport.peak_memory_mb:.0f} MiB, "
          f"{qreport.paper_bits:.3f} bits/weight as the papers count, "
          f"{qreport.stored_bits:.3f} bits/weight stored")
    if note:
        print(f"note: {note}")
    if args.out:
        with run.keeping_report():
            if not run.streamed:  # a streamed run wrote --out as its layers finished
                save_or_keep(args, run.model, qreport, run.tokenizer, journal, identity)
        run.report["out"] = args.out
        print(f"model saved to {args.out} (see `binllm inspect {args.out}`)")
    _evaluate(run, seqlen, task_manager)
    if args.report:
        write_json_atomic(args.report, run.report)
        print(f"report written to {args.report}")
    return 0


def _configure(args, dist) -> _Run:
    """The run's QuantizeConfig and method, checked before anything is loaded."""
    from ..engine.config import QuantizeConfig
    from ..methods import get_method

    config = QuantizeConfig(method=args.method, method_args=parse_method_args(args.method_arg),
                            block_size=args.block_size, percdamp=args.percdamp,
                            feedback=args.feedback, skip=tuple(csv_list(args.skip)),
                            refine=parse_refine(args.refine, args.refine_arg),
                            distill=parse_distill(args.distill, args.distill_arg),
                            rotate=None if args.rotate == "none" else args.rotate,
                            embeddings=args.embeddings, lm_head=args.lm_head)
    method = get_method(config.method, config.method_args)  # fail fast on a bad argument
    if args.nsamples < 1:
        raise CLIError("--nsamples must be at least 1")
    return _Run(args, dist, config, method)


def _open_model(run: _Run) -> None:
    """A local safetensors checkpoint is streamed layer by layer (on every rank under
    torchrun, each reading its own copy of a layer); anything else, or a rotated or distilled
    run, is loaded whole."""
    args = run.args
    if not run.config.rotate and run.config.distill is None:
        run.streamed = open_streamed(
            args, tail=run.main and args.compare_fp and bool(run.eval_names))
    if run.streamed:
        run.model, run.tokenizer = run.streamed.model, run.streamed.tokenizer
    else:
        run.model, run.tokenizer = load_model(args.model, args.device, args.dtype)
    check_model(args, run.model)
    if args.out:
        check_out(args, run.model)  # now with the free space the packed model needs


def _fp_perplexity(run: _Run, seqlen: int) -> None:
    """--compare-fp: the unquantized model's perplexities, streamed when the run is."""
    args = run.args
    if run.streamed:  # the dense layers streamed from the checkpoint, one at a time
        ppl = evaluate_datasets(run.model, run.tokenizer, run.eval_names, seqlen, args,
                                perplexity=fp_streamed(run.streamed.checkpoint))
    else:
        run.model.to(args.device)
        ppl = evaluate_datasets(run.model, run.tokenizer, run.eval_names, seqlen, args)
        run.model.to("cpu")
    run.report["fp_perplexity"] = ppl
    print_ppl_table(ppl, "full precision")


def _calibration(run: _Run, seqlen: int) -> tuple[list, str | None]:
    """(calibration windows, the data source's note); the protocol goes into the report."""
    from ..evaluation.data import calibration_batches, load_text

    args = run.args
    source = load_text(args.calib, args.calib_split, args.data_dir)
    batches = calibration_batches(source, run.tokenizer, args.nsamples, seqlen, args.seed)
    protocol = {"calibration": source.name, "calibration_split": source.split,
                "calibration_note": source.note, "nsamples": args.nsamples,
                "seqlen": seqlen, "seed": args.seed, "eval_split": args.eval_split,
                "max_windows": args.max_windows}
    if run.dist is not None:
        protocol.update(processes=run.dist.world, dist_calib=run.dist.calib)
    run.report["protocol"] = protocol
    return batches, source.note


def _binarize(run: _Run, batches: list, keep_packed: bool):
    """(QuantizeReport, journal, run identity): the layers binarized, streamed or in memory,
    resuming from --resume-dir where it holds finished layers."""
    from ..engine.binarize import binarize_model
    from ..engine.journal import LayerJournal, run_identity

    args = run.args
    bar = Progress(args.method, "layer", quiet=args.quiet or not run.main)
    identity = run_identity(run.model, run.config, batches)
    journal = None
    if args.resume_dir and run.main:  # rank 0 reads and writes the journal, shares its layers
        journal = LayerJournal(args.resume_dir, identity)
        journal.verify()  # a damaged layer file stops the run now, with its name
        if journal.layers_done():
            print(f"resuming: {journal.layers_done()} layers restored from {args.resume_dir}")
    if run.streamed:  # --out is written as the layers finish
        from ..engine.stream import binarize_streaming

        qreport = binarize_streaming(run.model, run.streamed.checkpoint, run.config, batches,
                                     out=args.out if run.main else None,
                                     tokenizer=run.tokenizer, overwrite=args.overwrite,
                                     lock=False, dist=run.dist,
                                     keep_packed=run.main and keep_packed, device=args.device,
                                     on_layer=bar.update, journal=journal)
    else:
        qreport = binarize_model(run.model, run.config, batches, device=args.device,
                                 on_layer=bar.update, journal=journal, dist=run.dist,
                                 checked=True)  # check_model ran the checks
    bar.close()
    return qreport, journal, identity


def _evaluate(run: _Run, seqlen: int, task_manager) -> None:
    """Perplexities of the binarized model, then lm-eval tasks, into the report."""
    args = run.args
    if run.eval_names:
        run.model.to(args.device)
        run.report["perplexity"] = evaluate_datasets(run.model, run.tokenizer, run.eval_names,
                                                     seqlen, args)
        print_ppl_table(run.report["perplexity"], f"{args.method} (seqlen {seqlen})")
    if task_manager is not None:
        run.model.to(args.device)
        with run.keeping_report():
            run.report["lm_eval"] = run_lm_eval(run.model, run.tokenizer, args, args.method,
                                                task_manager)
