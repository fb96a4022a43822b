"""Several processes (torchrun): ranks, window shares, linear owners and the collectives.

Pure plumbing for `binarize_model(..., dist=Distributed(...))`; one process is
`SingleProcess()` (`single_process`), the same interface without communication, so the layer
loop has one path.
Per decoder layer every rank issues the same collectives in the same order:

    guarded next(walk)    agree on errors of the capture / previous layer's forward
    decide(restore)       rank 0's journal says whether the layer is restored
    guard(Hessians)       local: collect XᵀX on this rank's windows (split) or owned linears
    reduce_hessians       split only: counts all-reduced, each XᵀX (one per input tensor)
                          reduced (fp64) to its owner(s)
    guard(solve)          local: reconstruct the linears this rank owns
    share_layer           all-gather layouts + reports, one byte buffer per linear broadcast
                          from its owner (codes packed by binllm.packed.layout.pack)
    (refine)              per step: average_gradients (all-reduce); losses summed over the
                          ranks; rank 0's refined codes shared (share_layer)
    guard(apply)          local: non-owned weights = codes.dequantize(); rank 0 journals

Two calibration modes. "split" (the default): the windows are cut into contiguous shares, one
per rank; each rank sums XᵀX over its share in fp32 exactly as one process does, the partial
sums are added in fp64 and rounded once to fp32, so H equals one process's H up to fp32
round-off (the order of the additions differs) and the codes may differ in a few near-tie
weights. "replicated": every rank runs every window and accumulates only the Hessians of the
linears it owns, with the same addmm sequence as one process, so H and the codes are
bit-identical to one process (same kernels, same threads per process); only the Hessian
work and the solve are divided.

A failure on one rank reaches the others at the next guard: every rank raises, the failing
one its own exception, the others `DistributedError` naming the rank and the message. A rank
that dies makes the others' next collective fail (gloo: connection closed; NCCL: the process
group timeout), which becomes a `DistributedError` too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from ..packed.layout import PackedLayout, pack, unpack
from ..errors import BinllmError

CALIB_MODES = ("split", "replicated")
REDUCE_CHUNK = 1 << 22  # elements of XᵀX per reduce: a (d, d) fp64 copy is never made whole
HEAVY_COST = 2.0  # cost factor of methods with X-space iterations on the Gram matrix (ARB-X)


class DistributedError(BinllmError, RuntimeError):
    """Another rank failed, a rank was lost, or the run cannot be split this way."""

    def __init__(self, message: str, lost_contact: bool = False):
        super().__init__(message)
        self.lost_contact = lost_contact


def window_share(n: int, rank: int, world: int) -> range:
    """Contiguous share of n windows for `rank`; the first n % world ranks get one more."""
    if world > n:
        raise DistributedError(
            f"{world} processes but only {n} calibration windows: every rank needs at least "
            f"one; use nsamples={world} or more, or --nproc_per_node {n} or fewer")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def linear_cost(rows: int, cols: int, heavy: bool = False) -> float:
    """Estimated solve cost of one linear: rows · cols² (the feedback), ×HEAVY_COST for ARB-X."""
    return float(rows) * cols * cols * (HEAVY_COST if heavy else 1.0)


def assign_owners(costs: Mapping[str, float], world: int) -> dict[str, int]:
    """Greedy bin-packing (longest first): each linear to the least-loaded rank.

    Ties go to the earlier linear and the lower rank, so every rank computes the same map.
    """
    loads = [0.0] * world
    owners = {}
    order = sorted(costs, key=lambda n: (-costs[n], list(costs).index(n)))
    for name in order:
        r = min(range(world), key=lambda k: (loads[k], k))
        owners[name] = r
        loads[r] += costs[name]
    return {n: owners[n] for n in costs}  # registration order


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _backend_reason(e: BaseException) -> str:
    """The gist of a backend error: gloo's "[file.cc:537] Read error ...: Connection reset by
    peer. This is typically ..." becomes "Read error ...: Connection reset by peer"."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


@dataclass
class Distributed:
    """This process's place in the group; methods are collectives unless noted.

    rank, world   from torchrun's RANK / WORLD_SIZE
    device        where collective tensors live (cuda:LOCAL_RANK for NCCL, cpu for gloo)
    calib         "split" | "replicated" (module docstring)
    reduce_dtype  dtype in which the partial Hessians are added (float64; float32 halves the
                  traffic and adds ⌈log2 world⌉ fp32 roundings per entry)
    """

    rank: int
    world: int
    device: torch.device = torch.device("cpu")
    calib: str = "split"
    reduce_dtype: torch.dtype = torch.float64

    def __post_init__(self):
        if self.calib not in CALIB_MODES:
            raise DistributedError(f"calibration mode {self.calib!r}: use one of "
                                   f"{', '.join(CALIB_MODES)}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- local decisions (no communication) -------------------------------------------
    def local_windows(self, calibration: list[Tensor]) -> list[Tensor]:
        share = window_share(len(calibration), self.rank, self.world)
        return calibration if self.calib == "replicated" else [calibration[k] for k in share]

    def owners(self, shapes: Mapping[str, tuple[int, int]], heavy: bool) -> dict[str, int]:
        return assign_owners({n: linear_cost(*s, heavy) for n, s in shapes.items()},
                             self.world)

    def hessian_names(self, names: list[str], owners: Mapping[str, int]) -> list[str]:
        """Linears whose XᵀX this rank accumulates: all (split) or its own (replicated)."""
        return list(names) if self.calib == "split" else \
            [n for n in names if owners[n] == self.rank]

    # ---- collectives --------------------------------------------------------------------
    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # DistBackendError and gloo's errors are RuntimeErrors
            raise DistributedError(
                f"rank {self.rank} lost contact with the other ranks during {what} "
                f"({_backend_reason(e)}); a rank died or timed out, see its output; rerun the same "
                "command (with resume_dir= to keep finished layers)", lost_contact=True) from None

    def gather_objects(self, obj: Any, what: str) -> list[Any]:
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world
        self._collective(what, tdist.all_gather_object, out, obj)
        return out

    def agree(self, error: BaseException | None, what: str) -> None:
        """Every rank says whether `what` failed; if any did, every rank raises."""
        messages = self.gather_objects(None if error is None else _describe(error), what)
        if error is not None:
            raise error
        for r, m in enumerate(messages):
            if m is not None:
                raise DistributedError(f"rank {r} failed ({what}): {m}")

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run local work; then all ranks agree on whether it failed somewhere."""
        try:
            yield
        except DistributedError:
            raise  # the group is broken or already agreed: no further collective
        except Exception as e:  # noqa: BLE001 - handed to every rank, then re-raised
            self.agree(e, what)
        else:
            self.agree(None, what)

    def guarded(self, items: Iterator[Any], what: str) -> Iterator[Any]:
        """Iterate `items`, agreeing after every step (the walker's capture and forwards)."""
        end = object()
        while True:
            with self.guard(what):
                item = next(items, end)
            if item is end:
                return
            yield item

    def decide(self, flag: bool, what: str = "resume") -> bool:
        """Rank 0's flag on every rank."""
        import torch.distributed as tdist

        box = [bool(flag)]
        self._collective(what, tdist.broadcast_object_list, box, src=0)
        return bool(box[0])

    def reduce_hessians(self, accs: dict[str, Any], owners: Mapping[str, int]) -> dict[str, Any]:
        """Sum each accumulator's XᵀX and count over the ranks, onto its owners (split mode).

        Linears that read one input share one accumulator (`collect_hessians`); it is reduced
        once, onto its one owner (`reduce`) or, when its linears have several owners, onto
        every rank (`all_reduce`). Should the ranks have grouped the linears differently, every
        linear is reduced on its own (a copy of a shared sum). Returns the owned accumulators,
        now holding the full sums; the others are dropped.
        """
        import torch.distributed as tdist

        if self.calib != "split":
            return {n: a for n, a in accs.items() if owners[n] == self.rank}
        groups: dict[int, list[str]] = {}  # one entry per accumulator, in the order of accs
        for n, a in accs.items():
            groups.setdefault(id(a), []).append(n)
        grouping = [tuple(g) for g in groups.values()]
        if any(g != grouping for g in self.gather_objects(grouping, "Hessian grouping")):
            grouping = [(n,) for n in accs]  # not the same on every rank: one by one
        counts = torch.tensor([accs[g[0]].nsamples for g in grouping], dtype=torch.int64,
                              device=self.device)
        self._collective("Hessian counts", tdist.all_reduce, counts)
        owned = {}
        for k, names in enumerate(grouping):
            acc = accs[names[0]]
            dst = {owners[n] for n in names}
            shared = len(names) < sum(a is acc for a in accs.values())  # split by the fallback
            mine = acc
            if self.rank in dst and shared:  # the fallback: one sum per linear
                mine = copy.copy(acc)
                mine.XtX = torch.empty_like(acc.XtX)
            what = f"Hessian of {'/'.join(names)}"
            rows = max(1, REDUCE_CHUNK // acc.XtX.shape[1])
            for r0 in range(0, acc.XtX.shape[0], rows):  # each element on its own: same sums
                part = acc.XtX[r0:r0 + rows]
                buf = part.to(self.device, self.reduce_dtype, copy=True)  # (rows, d)
                if len(dst) == 1:
                    self._collective(what, tdist.reduce, buf, dst=next(iter(dst)))
                else:
                    self._collective(what, tdist.all_reduce, buf)
                if self.rank in dst:
                    mine.XtX[r0:r0 + rows] = buf.to(part.device, torch.float32)
            if self.rank in dst:
                mine.nsamples = int(counts[k])
                owned.update({n: mine for n in names if owners[n] == self.rank})
        return owned

    def share_layer(self, own: Mapping[str, tuple[Any, dict]], names: list[str],
                    owners: Mapping[str, int]) -> dict[str, tuple[Any, dict]]:
        """Every linear's (codes, report dict) on every rank, from `own` of each owner.

        Layouts and reports travel by all_gather_object; each linear's packed tensors as one
        uint8 buffer broadcast from its owner, in the order of `names`. The owner keeps its
        own codes object; the others unpack theirs (which dequantize to the same weights).
        """
        import torch.distributed as tdist

        packed, meta = {}, {}
        for name, (codes, rep) in own.items():
            layout, tensors = pack(codes)
            packed[name] = tensors
            meta[name] = (layout.to_dict(), rep)
        gathered: dict[str, tuple[dict, dict]] = {}
        for part in self.gather_objects(meta, "code layouts"):
            gathered.update(part)
        out = {}
        for name in names:
            layout = PackedLayout.from_dict(gathered[name][0])
            specs = layout.specs()
            keys = sorted(specs)
            nbytes = sum(specs[k].nbytes for k in keys)
            if nbytes == 0:
                pass
            elif owners[name] == self.rank:
                buf = torch.cat([packed[name][k].reshape(-1).view(torch.uint8).to(self.device)
                                 for k in keys])
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            if nbytes:
                self._collective(f"codes of {name}", tdist.broadcast, buf, src=owners[name])
            if owners[name] == self.rank:
                out[name] = own[name]
                continue
            tensors, offset = {}, 0
            for k in keys:
                s = specs[k]
                tensors[k] = buf[offset:offset + s.nbytes].clone().view(s.dtype).reshape(s.shape)
                offset += s.nbytes
            out[name] = (unpack(layout, tensors), gathered[name][1])
        return out

    def max_over_ranks(self, value: float, what: str = "peak memory") -> float:
        return max(self.gather_objects(float(value), what))

    def train_windows(self, n: int, limit: int = 0) -> range:
        """This rank's training windows among its n local ones (refinement): all of them
        (split: they are its share) or its share of them (replicated); with `limit`, its
        share of `limit` windows in all, so that the ranks together train on `limit`."""
        if self.calib == "replicated":
            return window_share(min(limit or n, n), self.rank, self.world)
        return range(min(len(window_share(limit, self.rank, self.world)), n) if limit else n)

    def sum_over_ranks(self, values: list[float], what: str) -> list[float]:
        """Each value summed over the ranks (fp64), the same sums on every rank."""
        import torch.distributed as tdist

        buf = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._collective(what, tdist.all_reduce, buf)
        return buf.tolist()

    def average_gradients(self, params: list[Tensor], stepped: bool) -> None:
        """One training step of data parallelism: every parameter's gradient becomes the mean
        of the gradients of the ranks that `stepped` (a rank whose windows ran out adds
        nothing), in one all-reduce of one fp32 buffer; the same gradients on every rank."""
        import torch.distributed as tdist

        grads = [p.grad.reshape(-1).to(self.device, torch.float32)
                 if stepped and p.grad is not None
                 else torch.zeros(p.numel(), device=self.device) for p in params]
        buf = torch.cat(grads + [torch.tensor([float(stepped)], device=self.device)])
        self._collective("refinement gradients", tdist.all_reduce, buf)
        count, offset = float(buf[-1]), 0
        for p in params:
            g = buf[offset:offset + p.numel()] / count
            p.grad = g.reshape(p.shape).to(device=p.device, dtype=p.dtype)
            offset += p.numel()


def report_dict(report: Any) -> dict[str, Any]:
    """A linear report as a plain dict (what `share_layer` carries)."""
    return dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(report)


def guard(dist: Distributed | None, what: str):
    """`dist.guard(what)`, or nothing in one process."""
    return contextlib.nullcontext() if dist is None else dist.guard(what)


def from_env(device: str = "cpu", calib: str = "split",
             timeout_s: float = 1800.0) -> tuple[Distributed | None, str]:
    """(Distributed, compute device) when started by torchrun with WORLD_SIZE > 1, else
    (None, device). Initialises the process group: NCCL when `device` is CUDA (each rank on
    cuda:LOCAL_RANK), gloo on the CPU; `timeout_s` bounds every collective."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, device
    import torch.distributed as tdist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if torch.cuda.device_count() <= local:
            raise DistributedError(f"rank {rank} wants cuda:{local} but this machine has "
                                   f"{torch.cuda.device_count()} GPUs; use --nproc_per_node "
                                   f"{torch.cuda.device_count()} or fewer")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        kwargs = {"device_id": torch.device(device)} if cuda else {}
        tdist.init_process_group("nccl" if cuda else "gloo",
                                 timeout=timedelta(seconds=timeout_s), **kwargs)
    return Distributed(rank, world, torch.device(device if cuda else "cpu"), calib), device
