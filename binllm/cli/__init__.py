"""The command line (`binllm …`): one module per command group.

`app` builds the parser and maps library errors to one-line messages (exit 2; `errors`
turns the library's argument names into flags); `guards` checks arguments and output paths
before any work; `common` holds
what the commands share (`CLIError`, argument helpers, the model loader, perplexity tables);
`quantize`, `evaluate` (eval, methods), `packed` (inspect, generate), `qat` and `lmeval`
(`--tasks`) each register their subcommands; `output` holds quantize's --out checks and the
save that keeps the work when it fails, `distributed` its torchrun side. Command modules
import `common` and the library, never each other's entry points; the library never imports the CLI.
"""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
