"""`CLIError`, a user error the CLI reports in one line (exit status 2), and `cli_message`,
which puts the library's argument names into command-line words.

Its own module so that every CLI module can raise it without importing `common`
(`common` re-exports it)."""

from __future__ import annotations

import re

from ..errors import BinllmError

# the library's argument names (its messages say `skip=…`) → the flags that set them
ARGUMENT_FLAGS = {"skip": "--skip", "resume_dir": "--resume-dir", "out": "--out",
                  "out_dir": "--out", "overwrite": "--overwrite", "fresh": "--fresh",
                  "nsamples": "--nsamples", "percdamp": "--percdamp", "seqlen": "--seqlen",
                  "data_dir": "--data-dir", "include_path": "--tasks-path",
                  "feedback": "--feedback", "max_new_tokens": "--max-new-tokens",
                  "resume": "--resume", "loop": "--loop", "top_p": "--top-p",
                  "chat": "--chat"}
_ARGUMENT = re.compile(r"(?<![\w.:=-])(" + "|".join(ARGUMENT_FLAGS) + r")="
                       r"(?:(?P<true>True)\b|'(?P<quoted>[^'\s]*)'|(?P<value>[^\s;,)]+))?")


class CLIError(BinllmError):
    """A user error the CLI reports in one line."""


def cli_message(text: str) -> str:
    """A library message as the command line says it: `skip=down_proj` → `--skip down_proj`,
    `overwrite=True` → `--overwrite`, `feedback='none'` → `--feedback none`, a bare
    `seqlen=` → `--seqlen`."""
    def flag(m: re.Match) -> str:
        name = ARGUMENT_FLAGS[m.group(1)]
        if m["true"]:
            return name
        value = m["quoted"] if m["quoted"] is not None else m["value"]
        if value is None or value == ".":  # `seqlen=` at the end of a clause
            return name + (value or "")
        return f"{name} {value}"
    return _ARGUMENT.sub(flag, text)
