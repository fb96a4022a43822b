"""`binllm export DIR --format gguf OUT.gguf`: a saved binllm model for another runtime.

Registered in `binllm.cli.app.COMMANDS`; parses, checks that `--report` is neither OUT nor
inside DIR (`check_args` has already checked it can be written), calls
`binllm.export.gguf_export.export_gguf` (which checks OUT before any work) and prints what was
written.
"""

from __future__ import annotations

from pathlib import Path

from ..packed.output import is_binllm_dir
from .common import CLIError, write_json_atomic


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a saved binllm model in another runtime's format")
    p.add_argument("model", help="directory written by `binllm quantize … --method q1_0 --out DIR`")
    p.add_argument("out", help="output file, e.g. model.gguf (never inside DIR)")
    p.add_argument("--format", default="gguf", choices=["gguf"],
                   help="gguf: llama.cpp (binarized linears as Q1_0)")
    p.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece tokenizer.model or tokenizer.json to take the vocabulary "
                        "from (default: DIR/tokenizer.model, else DIR/tokenizer.json)")
    p.add_argument("--tokenizer-pre", default=None,
                   help="tokenizer.ggml.pre of a byte-level BPE vocabulary, as llama.cpp's "
                        "converter names it (e.g. gpt-2, smollm, qwen2, llama-bpe); default: "
                        "detected from tokenizer.json")
    p.add_argument("--float-type", default="auto", choices=["auto", "f16", "f32"],
                   help="type of the tensors that are not binarized (auto: F32 stays F32)")
    p.add_argument("--fallback-type", default="f16", choices=["f16", "q8_0", "q4_0"],
                   help="type of binarized linears Q1_0 cannot hold (in_features not a multiple "
                        "of 128): f16 is exact, q8_0 / q4_0 are quantized from their ±α weights")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (never a file inside DIR)")
    p.add_argument("--report", default=None, help="write the list of tensors as JSON here")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from ..export.gguf_export import export_gguf

    if not is_binllm_dir(args.model):
        raise CLIError(f"{args.model} is not a binllm directory; write one with "
                       "`binllm quantize MODEL --method q1_0 --out DIR`")
    if args.report:
        report_path, model = Path(args.report).resolve(), Path(args.model).resolve()
        if report_path == Path(args.out).resolve():
            raise CLIError(f"--report {args.report} is the output file; name another file")
        if model in report_path.parents:
            raise CLIError(f"--report {args.report} is inside the model directory "
                           f"{args.model}; export never writes there: choose a path outside it")
    report = export_gguf(args.model, args.out, tokenizer_model=args.tokenizer_model,
                         float_type=args.float_type, fallback_type=args.fallback_type,
                         tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite)
    print(f"{report.path}: {report.file_bytes / 2**20:,.2f} MiB, {report.file_type}, "
          f"{report.counts()}; {report.tokenizer} vocabulary from {report.vocab_source}")
    for t in report.tensors:
        if t.note:
            print(f"  {t.name}: {t.note}")
    if args.report:
        write_json_atomic(args.report, {"command": "export", **report.to_dict()})
    return 0
