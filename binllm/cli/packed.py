"""CLI subcommands on saved binllm directories: `binllm inspect DIR`, `binllm generate DIR "…"`.

Registered in `binllm.cli.app.COMMANDS`; like the rest of the CLI they parse, call one library
function and print.
"""

from __future__ import annotations

import sys

from ..packed.output import is_binllm_dir
from .common import CLIError, add_prefill, apply_prefill, load_saved, write_json_atomic
from .guards import bf16_speed_note, read_config


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="per-layer stored bits (measured on disk) of a saved model")
    p.add_argument("model", help="directory written by `binllm quantize … --out DIR`")
    p.add_argument("--verify", action="store_true", help="also check the files' sha256")
    p.add_argument("--report", default=None, help="write the inspection as JSON here")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from ..packed.saved_dir import inspect_saved

    read_config(args.model)  # a config.json that is no JSON object: one line, not a traceback
    verified = None
    if args.verify:  # every check of binllm.load, the sha256 of each shard included
        from ..packed.checkpoint import verify_saved

        verified = verify_saved(args.model)
    info = inspect_saved(args.model)
    args_text = ", ".join(f"{k}={v}" for k, v in info.method_args.items())
    print(f"{info.path}: method {info.method} ({args_text}), format_version {info.format_version}")
    width = max([len(lay.name) for lay in info.layers] + [5])
    print(f"  {'layer':<{width}}  {'format':<14} {'shape':>11}  {'bits/w disk':>11}  "
          f"{'paper bits':>10}  {'stored':>11}")
    for lay in info.layers:
        shape = f"{lay.shape[0]}×{lay.shape[1]}"
        print(f"  {lay.name:<{width}}  {lay.format:<14} {shape:>11}  {lay.stored_bits:>11.3f}  "
              f"{lay.paper_bits:>10.3f}  {_kib(lay.stored_bytes):>11}")
    agree = "=" if abs(info.stored_bits - info.codes_bits) < 1e-12 else "≠"
    print(f"  total: {len(info.layers)} binarized linears, "
          f"{info.stored_bits:.3f} stored bits/weight "
          f"measured on disk ({agree} {info.codes_bits:.3f} by the codes' accounting), "
          f"{info.paper_bits:.3f} paper bits")
    print(f"  files {_kib(info.file_bytes)} vs fp16 {_kib(info.fp16_bytes)} "
          f"({info.file_bytes / info.fp16_bytes:.3f}×), {info.file_bits:.3f} bits per parameter "
          f"for the whole model; unchanged tensors {_kib(info.other_bytes)}")
    if verified is not None:
        print(f"  verified: {verified.summary()}")
    if args.report:
        extra = {} if verified is None else {"verified": verified.summary()}
        write_json_atomic(args.report, {"command": "inspect", **info.to_dict(), **extra})
    return 0


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a saved binllm model")
    p.add_argument("model", help="directory written by `binllm quantize … --out DIR`")
    p.add_argument("prompt", help="text to continue (with --chat: the user's message)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the most likely tokens up to this probability")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--cache-dequantized", action="store_true",
                   help="dequantize every packed weight once and keep it (fp memory, dense "
                        "speed) instead of the default fast kernels on the packed bits")
    p.add_argument("--no-cache", action="store_true",
                   help="keep no dequantized weights (the default; kept for old scripts)")
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1 …")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the unchanged tensors (auto: as saved)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads of torch (0: torch's default, one per core); a model as "
                        "small as stories260K runs fastest on 1, more only add waits")
    p.add_argument("--exact-length", action="store_true",
                   help="generate exactly --max-new-tokens (no stop at end of text; timing)")
    p.add_argument("--loop", default="auto", choices=["auto", "lean", "transformers"],
                   help="what runs the tokens: binllm's lean decode loop (LLaMA, Mistral, "
                        "Qwen2), transformers' generate, or auto (lean where it applies)")
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as a user's message through the tokenizer's chat template "
                        "and print the model's reply (chat / instruct models)")
    p.add_argument("--system", default=None,
                   help="with --chat: a system message before the user's")
    p.add_argument("--stream", action="store_true",
                   help="print the text as the tokens are generated (the printing is inside "
                        "the timed run)")
    add_prefill(p)
    p.add_argument("--original", action="store_true",
                   help="MODEL is an ordinary (dense) Hugging Face model, e.g. the original a "
                        "binllm directory was made from: generate with it the same way")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import torch

    if args.max_new_tokens < 1:
        raise CLIError("--max-new-tokens must be at least 1")
    if args.threads < 0:
        raise CLIError(f"--threads {args.threads}: use 1 or more (0 = torch's default)")
    if args.system is not None and not args.chat:
        raise CLIError("--system needs --chat (the chat template places the system message)")
    if args.original:
        if is_binllm_dir(args.model):
            raise CLIError(f"{args.model} is a binllm directory; drop --original")
    elif not is_binllm_dir(args.model):
        raise CLIError(f"{args.model} is not a binllm directory; write one with "
                       "`binllm quantize MODEL --method … --out DIR` (or pass --original to "
                       "generate with an ordinary model)")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _generate(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their setting


def _generate(args) -> int:
    from ..evaluation.generate import generate
    from ..packed.layers import set_cache_dequantized
    from .common import load_model

    if args.original:
        model, tokenizer = load_model(args.model, "cpu", args.dtype)
        model.eval()
    else:  # kernel forms are derived here, at load, not inside the timed generation
        model, tokenizer = load_saved(args.model, args.dtype)
        set_cache_dequantized(model, args.cache_dequantized and not args.no_cache)
    apply_prefill(model, args)
    model.to(args.device)
    slow = bf16_speed_note(getattr(model, "dtype", None), args.device)
    if slow:
        print(f"note: {slow}", file=sys.stderr)
    streamer = None
    if args.stream:  # the text as its tokens arrive (a chat: the reply alone)
        from transformers import TextStreamer

        # decoding the prompt with the new tokens keeps the space a tokenizer puts before them
        streamer = TextStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=True)
    res = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                   device=args.device, exact_length=args.exact_length, loop=args.loop,
                   chat=args.chat, system=args.system, streamer=streamer)
    if res.note:
        print(f"note: {res.note}", file=sys.stderr)
    if streamer is None:
        print(res.text)
    steps = "" if res.new_tokens < 2 else (
        f"; the prompt's {res.prompt_tokens} tokens {res.first_token_s:.2f} s, then "
        f"{res.decode_tokens_per_s:.1f} tokens/s")
    print(f"\n[{res.new_tokens} new tokens in {res.seconds:.2f} s, "
          f"{res.tokens_per_s:.1f} tokens/s{steps}, {res.loop} loop]")
    return 0
