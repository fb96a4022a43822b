"""`binllm export DIR --format gguf OUT.gguf`: a saved binllm model for another runtime.

Registered in `binllm.cli.app.COMMANDS`; parses, calls `binllm.export.gguf_export.export_gguf` and
prints what was written.
"""

from __future__ import annotations

from ..packed.output import is_binllm_dir
from .common import CLIError, write_json_atomic


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a saved binllm model in another runtime's format")
    p.add_argument("model", help="directory written by `binllm quantize … --method q1_0 --out DIR`")
    p.add_argument("out", help="output file, e.g. model.gguf")
    p.add_argument("--format", default="gguf", choices=["gguf"],
                   help="gguf: llama.cpp (binarized linears as Q1_0)")
    p.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece tokenizer.model to take the vocabulary from (default: "
                        "DIR/tokenizer.model, else DIR/tokenizer.json)")
    p.add_argument("--float-type", default="auto", choices=["auto", "f16", "f32"],
                   help="type of the tensors that are not binarized (auto: F32 stays F32)")
    p.add_argument("--report", default=None, help="write the list of tensors as JSON here")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from ..export.gguf_export import ExportError, export_gguf

    if not is_binllm_dir(args.model):
        raise CLIError(f"{args.model} is not a binllm directory; write one with "
                       "`binllm quantize MODEL --method q1_0 --out DIR`")
    try:
        report = export_gguf(args.model, args.out, tokenizer_model=args.tokenizer_model,
                             float_type=args.float_type)
    except ExportError as e:
        raise CLIError(str(e)) from None
    print(f"{report.path}: {report.file_bytes / 2**20:,.2f} MiB, {report.count('Q1_0')} Q1_0, "
          f"{report.count('F16')} F16, {report.count('F32')} F32 tensors; "
          f"vocabulary from {report.vocab_source}")
    for t in report.tensors:
        if t.note:
            print(f"  {t.name}: {t.note}")
    if args.report:
        write_json_atomic(args.report, {"command": "export", **report.to_dict()})
    return 0
