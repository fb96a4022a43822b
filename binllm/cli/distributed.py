"""`torchrun --nproc_per_node=N -m binllm quantize ...`: the command line's side of it.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; with WORLD_SIZE > 1
`quantize` joins the group (NCCL with --device cuda, each rank on cuda:LOCAL_RANK; gloo on the
CPU), every rank calibrates and solves its share (`binllm.engine.distributed`), and rank 0
alone prints, evaluates, writes --out / --report / the --resume-dir journal.
"""

from __future__ import annotations

import os
import signal

from .common import CLIError


def _terminated(signum, frame):
    """torchrun stops the other ranks with SIGTERM when one fails: say so in one line."""
    from ..engine.distributed import DistributedError

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise DistributedError("stopped by torchrun because another rank failed (its report "
                           "follows); rerun the same command (with --resume-dir to keep "
                           "finished layers)")


def add_dist_args(p) -> None:
    g = p.add_argument_group("several processes (torchrun)")
    g.add_argument("--dist-calib", choices=["split", "replicated"], default="split",
                   help="split: each rank runs its share of the calibration windows, Hessians "
                        "summed across ranks (equal to one process up to fp32 round-off); "
                        "replicated: every rank runs every window and accumulates only the "
                        "Hessians it owns (codes bit-identical to one process)")
    g.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="longest wait of one rank for the others at a collective (default 1800)")


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CLIError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def start(args):
    """The `Distributed` of this rank (None in one process); args.device becomes the rank's
    device and args.quiet is set on every rank but 0. Refuses more ranks than windows before
    any process group exists, so that error needs no other rank."""
    world = world_size()
    if world <= 1:
        return None
    if args.nsamples < world:
        raise CLIError(f"--nsamples {args.nsamples} is fewer than the {world} processes "
                       f"(torchrun --nproc_per_node): every rank needs at least one "
                       f"calibration window; use --nsamples {world} or more, or "
                       f"--nproc_per_node {args.nsamples} or fewer")
    if args.dist_timeout <= 0:
        raise CLIError(f"--dist-timeout {args.dist_timeout}: use a positive number of seconds")
    from ..engine.distributed import from_env

    dist, device = from_env(args.device, args.dist_calib, args.dist_timeout)
    args.device = device
    signal.signal(signal.SIGTERM, _terminated)
    if not dist.is_main:
        args.quiet = True
    return dist


def finish(dist) -> None:
    if dist is not None:
        import torch.distributed as tdist

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if tdist.is_initialized():
            tdist.destroy_process_group()
