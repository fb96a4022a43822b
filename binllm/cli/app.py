"""Command line: `binllm quantize | eval | methods | qat | inspect | generate | export | compare`.

Each subcommand module has an `add_<name>(subparsers)` function that registers its parser and
sets `func`; the library does the work and returns report objects, the command modules print
tables, show progress and write files. This module builds the parser (every option's help
shows its default), checks the arguments before any work (`guards.check_args`) and maps the
library's errors to one-line messages with exit status 2 (`errors.cli_message` puts the
library's argument names, `skip=`, into flags, `--skip`); Ctrl-C ends with one line and
status 130, a closed stdout pipe (`binllm methods | head`) quietly with 141.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .compare import add_compare
from .errors import cli_message
from .evaluate import add_eval, add_methods
from .export import add_export
from .guards import check_args
from .packed import add_generate, add_inspect
from .progress import stderr_is_terminal, third_party_bars_off
from .qat import add_qat
from .quantize import add_quantize

log = logging.getLogger("binllm")

COMMANDS = (add_quantize, add_eval, add_methods, add_qat, add_inspect, add_generate, add_export,
            add_compare)


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option whose help does not already say its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS \
            or (isinstance(default, (str, list)) and not default)
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: {'%(default)s'})"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    parts = []
    for pkg in ("torch", "transformers"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} not installed")
    return f"binllm {__version__} ({', '.join(parts)})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binllm", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=_version(),
                        help="print the versions of binllm, torch and transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every linear")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress output (also silences transformers' and lm-eval's bars)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
    return parser


def _interrupted(args) -> str:
    resume = getattr(args, "resume_dir", None)
    if resume:
        return (f"binllm: interrupted; finished layers are kept in {resume}, "
                "rerun the same command to resume")
    if getattr(args, "command", None) == "quantize":
        return ("binllm: interrupted; nothing was saved "
                "(pass --resume-dir DIR to keep finished layers)")
    return "binllm: interrupted"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        from ..errors import BinllmError

        try:
            check_args(args)
            with third_party_bars_off(args.quiet or not stderr_is_terminal()):
                code = args.func(args)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        except BinllmError as e:
            # under torchrun rank 0 prints every rank's error; the others only when they lost it
            if os.environ.get("RANK", "0") == "0" or getattr(e, "lost_contact", False):
                print(f"binllm: error: {cli_message(str(e))}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print(f"\n{_interrupted(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `binllm methods | head`: the reader is gone, so is our output
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    log.info("done in %.1f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
