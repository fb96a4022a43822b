"""Command line: `binllm quantize | eval | methods | qat | inspect | generate | compare`.

Each subcommand module has an `add_<name>(subparsers)` function that registers its parser and
sets `func`; the library does the work and returns report objects, the command modules print
tables, show progress bars and write files. This module builds the parser and maps the
library's errors to one-line messages with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .common import CLIError
from .compare import add_compare
from .evaluate import add_eval, add_methods
from .export import add_export
from .packed import add_generate, add_inspect
from .qat import add_qat
from .quantize import add_quantize

log = logging.getLogger("binllm")

COMMANDS = (add_quantize, add_eval, add_methods, add_qat, add_inspect, add_generate, add_export,
            add_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binllm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log every linear")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..engine.binarize import NonFiniteWeights
    from ..evaluation.data import DataError
    from ..engine.hessian import HessianNotPositiveDefinite
    from ..engine.journal import JournalMismatch
    from ..methods import MethodArgumentError
    from ..packed.packing import PackingError
    from ..packed.saved_dir import CheckpointError
    from ..engine.walker import UnsupportedArchitecture
    from ..engine.distributed import DistributedError

    known = (CLIError, DataError, MethodArgumentError, UnsupportedArchitecture,
             NonFiniteWeights, HessianNotPositiveDefinite, CheckpointError, PackingError,
             JournalMismatch, DistributedError)
    start = time.perf_counter()
    try:
        code = args.func(args)
    except known as e:
        # under torchrun rank 0 prints every rank's error; the others only when they lost it
        if os.environ.get("RANK", "0") == "0" or getattr(e, "lost_contact", False):
            print(f"binllm: error: {e}", file=sys.stderr)
        return 2
    log.info("done in %.1f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
