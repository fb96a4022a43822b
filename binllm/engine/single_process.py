"""`SingleProcess`: the layer loop's `Distributed` for one process.

`binarize_model` and `LayerRefiner` run one code path with or without torchrun: in one process
their collectives go to this stand-in, which has every window and linear and returns every
collective's input as its result (`binllm.engine.distributed` has the real ones).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor


class SingleProcess:
    """`Distributed`'s interface for one process: every window and linear is rank 0's, and
    every collective returns its own input."""

    rank, world, is_main = 0, 1, True

    def local_windows(self, calibration: list[Tensor]) -> list[Tensor]:
        return calibration

    def owners(self, shapes: Mapping[str, tuple[int, int]], heavy: bool) -> dict[str, int]:
        return {n: 0 for n in shapes}

    def hessian_names(self, names: list[str], owners: Mapping[str, int]) -> list[str]:
        return list(names)

    def guard(self, what: str):
        return contextlib.nullcontext()

    def guarded(self, items: Iterator[Any], what: str) -> Iterator[Any]:
        return items

    def decide(self, flag: bool, what: str = "resume") -> bool:
        return bool(flag)

    def reduce_hessians(self, accs: dict[str, Any], owners: Mapping[str, int]) -> dict[str, Any]:
        return accs

    def share_layer(self, own: Mapping[str, tuple[Any, dict]], names: list[str],
                    owners: Mapping[str, int]) -> dict[str, tuple[Any, dict]]:
        return {n: own[n] for n in names if n in own}

    def max_over_ranks(self, value: float, what: str = "peak memory") -> float:
        return value

    def train_windows(self, n: int, limit: int = 0) -> range:
        return range(min(limit or n, n))

    def sum_over_ranks(self, values: list[float], what: str) -> list[float]:
        return list(values)

    def average_gradients(self, params: list[Tensor], stepped: bool) -> None:
        pass
