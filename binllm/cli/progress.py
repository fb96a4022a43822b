"""Progress display of the CLI: a redrawn bar on a terminal, plain lines in a log, none with -q.

When stderr is not a terminal (a log file, a pipe, CI) a `\\r`-redrawn bar becomes kilobytes
of noise, so `Progress` prints one plain line per step it is told to report (each layer,
every tenth of the QAT steps, each finished dataset) instead. `third_party_bars_off()` keeps
the bars of transformers, datasets, huggingface_hub and lm-eval quiet for the same cases (and
for -q): they all draw through tqdm, so tqdm is told to draw nothing while the command runs.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """update(done, total) after each unit; close() at the end.

    mode "bar" (a tqdm bar), "lines" (one line on stderr when done is a multiple of `every`
    or reaches total; every=None: only the final line at close) or "off".
    """

    def __init__(self, desc: str, unit: str, *, quiet: bool, total: int | None = None,
                 every: int | None = 1, leave: bool = True):
        self.desc, self.unit, self.total, self.every = desc, unit, total, every
        self.mode = "off" if quiet else ("bar" if stderr_is_terminal() else "lines")
        self.done, self.start, self.postfix = 0, time.perf_counter(), ""
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(desc=desc, unit=unit, total=total, leave=leave)

    def update(self, done: int, total: int | None = None, **postfix) -> None:
        if total is not None:
            self.total = total
        previous, self.done = self.done, done
        self.postfix = ", ".join(f"{k} {v}" for k, v in postfix.items())
        if self._bar is not None:
            self._bar.total = self.total
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(done - previous)
        elif self.mode == "lines" and self.every and done > previous and (
                done == self.total or done // self.every > previous // self.every):
            self._line()

    def _line(self) -> None:
        total = f"/{self.total}" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.done}{total} {self.unit}s, "
              f"{time.perf_counter() - self.start:.1f} s{extra}", file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        """A line on stdout that does not break the bar."""
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self.every is None and self.done:
            self._line()


@contextlib.contextmanager
def third_party_bars_off(off: bool) -> Iterator[None]:
    """While the block runs, every tqdm bar is created disabled (when `off`); restored after.

    A scoped patch of tqdm's constructor: transformers' "Loading weights", datasets' and
    huggingface_hub's downloads and lm-eval's request loops all draw through tqdm.
    """
    if not off:
        yield
        return
    import tqdm.std

    original = tqdm.std.tqdm.__init__

    def init(self, *args, **kwargs):
        if len(args) > 10:  # disable given positionally (11th parameter)
            args = (*args[:10], True, *args[11:])
        else:
            kwargs["disable"] = True
        original(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = init
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original
