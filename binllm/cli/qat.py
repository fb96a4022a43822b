"""`binllm qat`: PB-LLM quantization-aware training from the command line."""

from __future__ import annotations

import logging
from typing import Any

from .common import (CLIError, add_common, csv_list, evaluate_datasets, load_model,
                     print_ppl_table, resolve_seqlen, write_json_atomic)
from .guards import check_calibration_memory
from .progress import Progress

log = logging.getLogger("binllm")
QAT_EVAL_WINDOWS = 64  # default --max-windows of `binllm qat`


def add_qat(sub) -> None:
    p = sub.add_parser("qat", help="PB-LLM quantization-aware training (frozen high-bit salient "
                                   "weights, α·sign(w) for the rest)")
    p.add_argument("model", help="local model directory or hub id")
    p.add_argument("--train", default="c4", help="training text: dataset name or .txt/.jsonl path")
    p.add_argument("--train-split", default="train", choices=["train", "validation", "test"],
                   help="split of a named training dataset")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=2, help="windows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=4,
                   help="micro-batches accumulated per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup-ratio", type=float, default=0.05,
                   help="fraction of the steps spent in linear warm-up (cosine decay after)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--salient-fraction", type=float, default=0.1,
                   help="fraction of each linear's weights kept at --high-bit")
    p.add_argument("--high-bit", type=int, default=8, help="bits of the frozen salient weights")
    p.add_argument("--mask", choices=["magnitude", "hessian"], default="magnitude",
                   help="salient mask: signed-magnitude outliers, or the mask of a PB-LLM PTQ run")
    p.add_argument("--calib", default="c4", help="calibration text for --mask hessian")
    p.add_argument("--calib-split", default="train", choices=["train", "validation", "test"],
                   help="split of --calib")
    p.add_argument("--nsamples", type=int, default=128,
                   help="calibration windows for --mask hessian")
    p.add_argument("--include-lm-head", action="store_true",
                   help="also binarize the LM head (the reference binarizes every nn.Linear)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on CUDA devices that support it)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, slower)")
    p.add_argument("--eval", default="wikitext2", help="comma-separated datasets ('' for none)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="perplexity every N steps (0: at the end)")
    p.add_argument("--checkpoint", default=None, help="file for the resumable training state")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="steps between checkpoint writes (with --checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint")
    p.add_argument("--out", default=None, help="save the trained model in the packed format here")
    p.add_argument("--seed", type=int, default=0, help="seed of the training windows")
    add_common(p)
    # a quick QAT run should not spend minutes in its evaluation: capped unless asked for all
    p.set_defaults(func=cmd_qat, max_windows=QAT_EVAL_WINDOWS)


def cmd_qat(args) -> int:
    from ..evaluation.data import calibration_batches, eval_tokens, load_text, tokenize
    from ..qat.model import QATConfig, QATError, finalize_qat, prepare_qat, ptq_masks
    from ..qat.train import train_qat

    if args.resume and not args.checkpoint:
        raise CLIError("--resume needs --checkpoint FILE")
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    seqlen = resolve_seqlen(model, args.seqlen)
    if args.mask == "hessian":
        check_calibration_memory(model, args.nsamples, seqlen, args.device, True)
    if csv_list(args.eval) and args.max_windows == QAT_EVAL_WINDOWS:
        print(f"qat: perplexity on the first {QAT_EVAL_WINDOWS} windows of each dataset "
              "(--max-windows all for the whole split)")
    try:
        config = QATConfig(
            salient_fraction=args.salient_fraction, high_bit=args.high_bit,
            include_lm_head=args.include_lm_head, steps=args.steps, batch_size=args.batch_size,
            grad_accum=args.grad_accum, seqlen=seqlen, lr=args.lr, weight_decay=args.weight_decay,
            warmup_ratio=args.warmup_ratio, seed=args.seed,
            bf16={"auto": None, "on": True, "off": False}[args.bf16],
            gradient_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
            eval_windows=args.max_windows, checkpoint_path=args.checkpoint,
            checkpoint_every=args.checkpoint_every if args.checkpoint else 0)
        train = load_text(args.train, args.train_split, args.data_dir)
        train_ids = tokenize(tokenizer, train.text)
        eval_names = csv_list(args.eval)
        if train.name in eval_names and train.split == args.eval_split:
            log.warning("training on %s/%s, which is also evaluated", train.name, train.split)
        evals = {n: eval_tokens(load_text(n, args.eval_split, args.data_dir), tokenizer, seqlen)
                 for n in eval_names if args.eval_every}
        masks = None
        if args.mask == "hessian":
            source = load_text(args.calib, args.calib_split, args.data_dir)
            batches = calibration_batches(source, tokenizer, args.nsamples, seqlen, args.seed)
            masks = ptq_masks(model, batches, config, device=args.device)
        names = prepare_qat(model, config, masks)
        bar = Progress("qat", "step", quiet=args.quiet, total=config.steps,
                       every=max(1, config.steps // 10))

        def on_step(info):
            bar.update(info.step, loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}")
            if info.evals:
                bar.write(f"step {info.step}: "
                          + ", ".join(f"{k} ppl {v:.3f}" for k, v in info.evals.items()))

        result = train_qat(model, train_ids, config, eval_sets=evals, device=args.device,
                           resume=args.checkpoint if args.resume else None, callback=on_step)
        bar.close()
        qreport = finalize_qat(model, config, args.mask)
    except QATError as e:
        raise CLIError(str(e)) from None
    print(f"\nqat: {len(names)} linears, steps {result.start_step}→{result.step} in "
          f"{result.seconds:.1f} s, final loss {result.losses[-1]:.4f}, "
          f"{qreport.paper_bits:.3f} paper bits, {qreport.stored_bits:.3f} stored bits/weight")
    report: dict[str, Any] = {"command": "qat", "model": args.model, "train": train.name,
                              "train_split": train.split, "train_note": train.note,
                              "training": result.to_dict(), "quantization": qreport.to_dict()}
    if eval_names:
        model.to(args.device)
        report["perplexity"] = evaluate_datasets(model, tokenizer, eval_names, seqlen, args)
        print_ppl_table(report["perplexity"], f"after QAT (seqlen {seqlen})")
    if args.out:
        from ..packed.checkpoint import save_binarized

        save_binarized(model.to("cpu"), qreport, tokenizer, args.out)
        print(f"model saved to {args.out}")
    if args.report:
        write_json_atomic(args.report, report)
    return 0
