"""`CLIError`: a user error the CLI reports in one line (exit status 2).

Its own module so that every CLI module can raise it without importing `common`
(`common` re-exports it)."""

from __future__ import annotations

from ..errors import BinllmError


class CLIError(BinllmError):
    """A user error the CLI reports in one line."""
