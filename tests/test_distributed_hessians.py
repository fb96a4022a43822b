"""Under torchrun, linears that read one input (q/k/v, gate/up) share one Hessian accumulator
as in one process: `Distributed.reduce_hessians` reduces each shared sum once (onto its one
owner, or onto every rank when its linears have several owners), and falls back to one sum
per linear when the ranks grouped the linears differently; XᵀX travels in row chunks (no
whole fp64 copy). Oracle: each linear's own XᵀX
summed over the ranks in fp64 and rounded once to fp32, as the unshared reduce does."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import free_port
from test_distributed import spawn_ranks

pytestmark = pytest.mark.slow  # spawns processes or runs a large matrix; `-m "not slow"` skips

D = 8


def _x(rank: int, which: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * rank + ord(which))
    return torch.randn(2, 5, D, generator=g)


def _accs(rank: int, shared: bool):
    from binllm.engine.hessian import HessianAccumulator

    a = HessianAccumulator(D)
    a.add_batch(_x(rank, "a"))
    b = a if shared else HessianAccumulator(D)
    if not shared:
        b.add_batch(_x(rank, "a"))  # the same input: the same sum, its own accumulator
    c = HessianAccumulator(D)
    c.add_batch(_x(rank, "c"))
    return {"a": a, "b": b, "c": c}


def _worker(rank, world, port, outdir):
    import torch.distributed as tdist
    from datetime import timedelta

    from binllm.engine.distributed import Distributed

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=world, timeout=timedelta(seconds=60))
    dist = Distributed(rank, world, calib="split")
    owners = {"a": 0, "b": 1, "c": 1}
    res = {}
    import binllm.engine.distributed as distributed

    for case, shared, chunk in (("same", (True, True), None), ("differ", (True, False), None),
                                ("chunked", (True, True), 3 * D), ("chunked differ",
                                                                   (True, False), 3 * D)):
        if chunk:  # 3 rows of XᵀX per reduce: each element is summed on its own, same bits
            distributed.REDUCE_CHUNK = chunk
        got = dist.reduce_hessians(_accs(rank, shared[rank]), owners)
        res[case] = {n: (acc.XtX.clone(), acc.nsamples, id(acc)) for n, acc in got.items()}
    tdist.destroy_process_group()
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))


def _want(which: str) -> torch.Tensor:
    total = torch.zeros(D, D, dtype=torch.float64)
    for r in (0, 1):  # each rank's fp32 addmm sum, added in fp64, rounded once
        X = _x(r, which).reshape(-1, D)
        total += torch.zeros(D, D).addmm_(X.T, X).double()
    return total.float()


def test_shared_accumulators_are_reduced_once_onto_their_owners(tmp_path):
    port = free_port()
    _, (r0, r1) = spawn_ranks(_worker, lambda r: (r, 2, port, str(tmp_path)), str(tmp_path))
    want = {"a": _want("a"), "b": _want("a"), "c": _want("c")}
    for case in ("same", "differ", "chunked", "chunked differ"):
        assert set(r0[case]) == {"a"} and set(r1[case]) == {"b", "c"}, case
        for res in (r0[case], r1[case]):
            for n, (XtX, nsamples, _) in res.items():
                assert nsamples == 4, (case, n)
                assert torch.equal(XtX, want[n]), (case, n)
    # b and c have one owner (rank 1), a and b share one accumulator with owners 0 and 1
    assert r1["same"]["b"][2] != r1["same"]["c"][2]
