"""`BinllmError`: the base of every error binllm raises for its user.

The command line prints any of them as `binllm: error: <message>` and exits with status 2;
a program catches `BinllmError` to handle them all. Each subclass also keeps the standard
base that says what went wrong (ValueError for bad input, RuntimeError for a failed run,
OSError for files), so that `except ValueError` works as it would elsewhere. Messages name
the function argument (`skip=`) when raised by the library; the CLI names its flags in its
own messages.
"""

from __future__ import annotations


class BinllmError(Exception):
    """An error binllm reports to its user in one line."""
