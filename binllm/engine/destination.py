"""Where a finished layer's codes go: the model's weights, the report, the journal, the writer.

The layer loop hands every finished layer (or, streamed in one process, every finished
linear) to one `CodesDestination`, which does what the run asks for:

- in memory: each linear computes with its *calibrated* weights (fp32 scales, as the
  references) while the walker feeds the next layer, then gets its *stored* weights (scales
  rounded to their storage precision): those pend until `flush()`;
- `keep_codes`: the stored codes go into the report (for packing by the caller);
- `journal`: the calibrated codes are saved (resume after a crash), unless they came from it;
- `source` (a streamed checkpoint): the stored codes replace the layer's linears by
  BinaryLinears when the walker releases the layer; without keep_codes they are packed at
  once, a bit or so per weight instead of the codes' bytes.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class CodesDestination:
    """One run's destination of codes (module docstring). `per_linear`: each linear's codes
    are packed as soon as it is solved (streamed, one process, nobody else needs them)."""

    def __init__(self, method, report, *, keep_codes: bool, journal=None, source=None,
                 per_linear: bool = False):
        self.method = method
        self.report = report
        self.keep_codes = keep_codes
        self.journal = journal
        self.source = source
        self.per_linear = per_linear
        # stored weights waiting for the walker to run the layer on the calibrated ones; a
        # streamed layer is replaced by BinaryLinears instead, so nothing pends
        self.pending: list[tuple[nn.Module, Tensor]] | None = [] if source is None else None

    def flush(self) -> None:
        """Give the pending linears their stored weights (the walker has run their layer)."""
        if self.pending is None:
            return
        for linear, Q in self.pending:
            linear.weight.data = Q.to(device=linear.weight.device)
        self.pending.clear()

    def linear(self, i: int, name: str, linear: nn.Module, calibrated) -> None:
        """One solved linear of layer i, packed at once (`per_linear` runs only)."""
        self.source.add_codes(i, name, self._store(linear, calibrated), linear.bias)

    def layer(self, i: int, path: str, linears: dict[str, nn.Module],
              calibrated: dict[str, Any], reports: list, *, Q: dict[str, Tensor] | None = None,
              journaled: bool = False) -> None:
        """Layer i's calibrated codes (name relative to the layer -> codes); `Q`: the stored
        weights where the caller has them already; `journaled`: they came from the journal.
        `calibrated` is emptied as its codes are handed on."""
        if self.journal is not None and not journaled:
            self.journal.save(i, calibrated, reports)
        if self.source is not None and not self.keep_codes:
            for n in list(calibrated):  # packed one by one: no layer of unpacked codes held
                self.source.add_codes(i, n, self._store(linears[n], calibrated.pop(n)),
                                      linears[n].bias)
            return
        stored = {n: self._store(linears[n], c, (Q or {}).get(n)) for n, c in calibrated.items()}
        calibrated.clear()
        if self.keep_codes:
            self.report.codes.update({f"{path}.{n}": c for n, c in stored.items()})
        if self.source is not None:  # the stored codes: what the saved directory holds
            self.source.set_codes(i, stored)

    def _store(self, linear: nn.Module, calibrated, Q: Tensor | None = None):
        """The stored codes of `calibrated` (scales rounded once); their weights pend when
        they differ from the calibrated ones (Q: those weights, if the caller has them)."""
        stored = self.method.store(calibrated)
        if stored is not calibrated and self.pending is not None:
            W = linear.weight.data
            Q = stored.dequantize() if Q is None else Q
            self.pending.append((linear, Q.to(device=W.device, dtype=W.dtype)))
        return stored
