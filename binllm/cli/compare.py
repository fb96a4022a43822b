"""`binllm compare`: every method on one protocol, each in its own process; table and plot."""

from __future__ import annotations

import sys

from .common import (LOAD_DTYPES, CLIError, check_model_path, check_seqlen, csv_list,
                     window_count)
from .guards import check_output_folder


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="run several methods on one protocol (resumable), "
                       "write results.json, results.md and frontier.png")
    p.add_argument("model", help="local model directory or hub id")
    p.add_argument("--methods", required=True, metavar="SPECS",
                   help="comma-separated method specs name[:key=value…], e.g. "
                        "billm,arb-llm-rc,gptq:bits=2,rtn-sign")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="results folder; rerunning on it skips the methods that finished")
    p.add_argument("--fresh", action="store_true",
                   help="discard DIR's earlier results (needed when the protocol changed)")
    p.add_argument("--calib", default="c4", help="calibration dataset name or .txt/.jsonl path")
    p.add_argument("--calib-split", default="train", choices=["train", "validation", "test"],
                   help="split of a named calibration dataset")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window sampling")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per window (default: min(2048, context))")
    p.add_argument("--block-size", type=int, default=128, help="columns per reconstruction block")
    p.add_argument("--percdamp", type=float, default=0.01,
                   help="Hessian damping as a fraction of its mean diagonal")
    p.add_argument("--eval", default="wikitext2,ptb,c4", help="comma-separated datasets")
    p.add_argument("--eval-split", default="test", choices=["test", "validation"],
                   help="split the perplexities are measured on")
    p.add_argument("--max-windows", type=window_count, default=None, metavar="N|all",
                   help="evaluate only the first N windows of each dataset (default: all)")
    p.add_argument("--data-dir", default=None,
                   help="folder laid out like ../shared/data "
                        "(default: $BINLLM_DATA, ./data, ../shared/data)")
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1 …")
    p.add_argument("--no-fp", action="store_true", help="do not evaluate the unquantized model")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="kill a method's process after this long (recorded as failed)")
    p.set_defaults(func=cmd_compare)


def check_compare(args) -> list:
    """Everything `binllm quantize` would refuse in a child, refused here before the FP model
    is evaluated and before --out is made: specs, model, seqlen, datasets, --out itself."""
    from ..evaluation.compare import CompareError, parse_method_specs
    from ..evaluation.data import locate

    try:
        runs = parse_method_specs(args.methods)
    except CompareError as e:
        raise CLIError(f"--methods: {e}") from None
    for run in runs:
        check_run(run, args)
    if not csv_list(args.eval):
        raise CLIError("--eval is empty: name at least one dataset, e.g. wikitext2")
    check_model_path(args.model)
    if args.seqlen is not None:
        check_seqlen(args.seqlen, _local_context(args.model))
    locate(args.calib, args.calib_split, args.data_dir)  # DataError: one line
    for name in csv_list(args.eval):
        locate(name, args.eval_split, args.data_dir)
    check_output_folder(args.out, "--out")
    return runs


def check_run(run, args) -> None:
    """One method spec as `binllm quantize` would take it: method, arguments, engine keys."""
    from ..engine.config import QuantizeConfig
    from ..errors import BinllmError
    from ..methods import get_method
    from .quantize import parse_distill, parse_refine

    engine = dict(run.engine)
    stages = {"refine": ("block", parse_refine), "distill": ("logits", parse_distill)}
    try:
        for key, allowed in {"rotate": ("none", "hadamard"),
                             **{k: ("none", on) for k, (on, _) in stages.items()}}.items():
            if engine.get(key, "none") not in allowed:
                raise CLIError(f"{key}={engine[key]}: use {' or '.join(allowed)}")
        if engine.get("dtype", "auto") not in LOAD_DTYPES:  # quantize's --dtype
            raise CLIError(f"dtype={engine['dtype']}: use {', '.join(LOAD_DTYPES)}")
        configs = {}
        for stage, (on, parse) in stages.items():
            pairs = [(k, f"{k.removeprefix(stage + '_')}={v}") for k, v in run.engine
                     if k.startswith(f"{stage}_")]
            if pairs and engine.get(stage, "none") == "none":
                raise CLIError(f"{pairs[0][0]} needs {stage}={on} in the same spec")
            configs[stage] = parse(engine.get(stage, "none"), [p for _, p in pairs])
        rotate = engine.get("rotate", "none")
        config = QuantizeConfig(method=run.method, method_args=dict(run.args),
                                block_size=args.block_size, percdamp=args.percdamp,
                                rotate=None if rotate == "none" else rotate,
                                feedback=engine.get("feedback"), **configs)
        get_method(config.method, config.method_args)
    except BinllmError as e:
        raise CLIError(f"method spec {run.label!r}: {e}") from None


def _local_context(model: str) -> int | None:
    """The context a local model's config.json declares (None for a hub id or no such key)."""
    import json
    from pathlib import Path

    from ..evaluation.perplexity import config_context

    try:
        return config_context(json.loads((Path(model) / "config.json").read_text()))
    except (OSError, ValueError):
        return None


def cmd_compare(args) -> int:
    from ..evaluation.compare import CompareError, Protocol, run_comparison

    runs = check_compare(args)
    protocol = Protocol(model=args.model, calib=args.calib, calib_split=args.calib_split,
                        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        eval=tuple(csv_list(args.eval)), eval_split=args.eval_split,
                        max_windows=args.max_windows, block_size=args.block_size,
                        percdamp=args.percdamp, data_dir=args.data_dir, device=args.device)
    tty = sys.stderr.isatty() and not args.quiet
    state = {"last": None}

    def show(ev) -> None:
        head = f"[{ev.index}/{ev.total}] {ev.label}" if ev.index else f"[FP] {ev.label}"
        if ev.stage in ("layers",) or ev.stage.startswith("ppl "):
            if args.quiet:
                return
            what = "layer" if ev.stage == "layers" else ev.stage
            line = f"{head}: {what} {ev.done}/{ev.of}"
            if tty:
                print(f"\r{line:<78}", end="", file=sys.stderr, flush=True)
            elif (ev.label, ev.stage) != state["last"]:  # one line per stage when not a tty
                print(line, file=sys.stderr, flush=True)
            state["last"] = (ev.label, ev.stage)
            return
        if tty:
            print("\r" + " " * 78 + "\r", end="", file=sys.stderr)
        state["last"] = None
        if ev.stage == "start":
            print(f"{head}: running", flush=True)
        elif ev.stage == "skipped":
            print(f"{head}: already done (same protocol), skipped", flush=True)
        elif ev.stage == "failed":
            print(f"{head}: FAILED: {ev.row.get('error')} (the others go on)", flush=True)
        elif ev.stage == "done" and ev.index:
            r = ev.row
            ppl = ", ".join(f"{d} {v['ppl']:.2f}" for d, v in r["perplexity"].items())
            print(f"{head}: {ppl}; {r['stored_bits']:.3f} stored bits "
                  f"({r['paper_bits']:.3f} paper), {r['seconds']:.1f} s", flush=True)
        elif ev.stage == "done":
            ppl = ", ".join(f"{d} {v['ppl']:.2f}" for d, v in ev.row["perplexity"].items())
            print(f"{head}: {ppl}", flush=True)

    try:
        res = run_comparison(runs, protocol, args.out, fresh=args.fresh, fp=not args.no_fp,
                             timeout=args.timeout, progress=show)
    except CompareError as e:
        raise CLIError(str(e)) from None
    print()
    print(res.markdown_path.read_text())
    print(f"results: {res.results_path}, table: {res.markdown_path}")
    if res.plot_path:
        print(f"plot: {res.plot_path}")
    else:
        print(f"plot skipped: {res.plot_skipped}")
    failed = [r["label"] for r in res.results["runs"] if r.get("status") != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)} (see {args.out}/logs/; rerun the same command "
              "to retry only those)")
    return 1 if failed else 0
