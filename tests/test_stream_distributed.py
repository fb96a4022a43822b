"""torchrun runs stream the checkpoint too: 2 gloo ranks on the CPU run `binllm quantize` (the
command line's `main`, each rank in its own spawned process with torchrun's environment) on
stories260K, which every rank streams layer by layer from its safetensors file.

One pair of ranks runs every scenario in turn (each command joins a fresh group on its own
port): three damaged checkpoints, billm streamed and `--no-stream`, billm with replicated
windows, a run interrupted on rank 0 and resumed by both ranks, and last a run in which rank 1
dies after two layers. The parent runs the
single-process references and compares the saved files byte for byte.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file, save_file

from test_distributed import DATA, NSAMPLES, SEQLEN, STORIES, spawn_ranks

pytestmark = pytest.mark.slow  # spawns processes or runs a large matrix; `-m "not slow"` skips

# streaming changes where a layer's weights come from, nothing of a method: one method here
# (tests/test_distributed.py runs billm and arb-llm-x across ranks in memory)
METHODS = ("billm",)


CALIB = Path(DATA) / "wikitext-2-raw" / "wiki.valid.raw"


def _calib_file(tmp: Path) -> Path:
    """The first 64 kB of wikitext2 validation: tokenizing the whole file took 1.6 s a run."""
    f = tmp / "calib.txt"
    f.write_text(CALIB.read_text()[:65536])
    return f


def _argv(model, out, *extra, calib: Path) -> list[str]:
    return ["-q", "quantize", str(model), "--method", "billm", "--calib", str(calib),
            "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--eval", "", "--out",
            str(out), *map(str, extra)]


def _damage(tmp: Path) -> dict[str, Path]:
    """stories260K saved in several shards, and three copies damaged in the ways a hostile
    checkpoint can be."""
    from transformers import AutoModelForCausalLM

    good = tmp / "sharded"
    AutoModelForCausalLM.from_pretrained(STORIES).save_pretrained(good, max_shard_size="100KB")
    for f in Path(STORIES).glob("tokenizer*"):
        shutil.copy(f, good / f.name)
    shards = sorted(good.glob("model-*.safetensors"))
    assert len(shards) >= 4, "the fixture must be sharded"
    out = {k: Path(shutil.copytree(good, tmp / k)) for k in ("missing", "truncated", "no_key")}
    (out["missing"] / shards[2].name).unlink()
    victim = out["truncated"] / shards[-1].name
    victim.write_bytes(victim.read_bytes()[:-100])
    key = "model.layers.3.mlp.down_proj.weight"
    index_file = out["no_key"] / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = out["no_key"] / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    return out


def _cli(rank: int, port: int, argv: list[str]) -> tuple[int, str, str | None, str]:
    """(exit code, stderr, the exception `quantize` raised on this rank, stdout) of one
    command."""
    import binllm.cli.quantize as q
    from binllm.cli import main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    raised: list[str] = []
    real = q._quantize

    def spy(*a, **k):
        try:
            return real(*a, **k)
        except Exception as e:
            raised.append(f"{type(e).__name__}: {e}")
            raise

    q._quantize = spy
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        q._quantize = real
    return code, err.getvalue(), raised[0] if raised else None, out.getvalue()


def _worker(rank: int, ports: list[int], tmp: str, damaged: dict[str, Path]):
    torch.set_num_threads(1)
    from binllm.cli.progress import Progress
    from binllm.engine.stream import SafetensorsCheckpoint

    tmp_path, ports, res = Path(tmp), iter(ports), {}
    calib = tmp_path / "calib.txt"
    try:
        for kind, ckpt in damaged.items():
            res[kind] = _cli(rank, next(ports), _argv(ckpt, tmp_path / f"out_{kind}", calib=calib))
        real_read = SafetensorsCheckpoint.read
        for method in METHODS:
            reads = []
            SafetensorsCheckpoint.read = lambda self, keys: reads.append(
                sorted({k.split(".")[2] for k in keys if k.startswith("model.layers.")})
            ) or real_read(self, keys)
            for label, extra in (("streamed", []), ("memory", ["--no-stream"])):
                del reads[:]
                res[method, label] = _cli(rank, next(ports), _argv(
                    STORIES, tmp_path / f"{method}_{label}", "--method", method, *extra,
                    calib=calib))
                res[method, label, "reads"] = list(reads)
            SafetensorsCheckpoint.read = real_read
        res["replicated"] = _cli(rank, next(ports), _argv(
            STORIES, tmp_path / "replicated", "--dist-calib", "replicated", calib=calib))

        def interrupt_after_2(self, done, total):  # Ctrl-C on rank 0 once two layers are done
            if rank == 0 and done == 2:
                raise KeyboardInterrupt

        update = Progress.update
        Progress.update = interrupt_after_2
        for label in ("interrupted", "resumed"):
            res[label] = _cli(rank, next(ports), _argv(
                STORIES, tmp_path / "resumed", "--dist-calib", "replicated", "--dist-timeout",
                60, "--resume-dir", tmp_path / "journal_resumed", calib=calib))
            Progress.update = update

        def die_after_2(self, done, total):  # rank 1 is killed once two layers are done
            if rank == 1 and done == 2:
                os._exit(3)

        Progress.update = die_after_2
        torch.save(res, tmp_path / f"rank{rank}.pt")  # rank 1 ends below
        res["killed"] = _cli(rank, next(ports), _argv(
            STORIES, tmp_path / "killed", "--dist-calib", "replicated",
            "--resume-dir", tmp_path / "journal", calib=calib))
    except Exception:  # noqa: BLE001 - reported to the parent
        res["crash"] = traceback.format_exc()
    torch.save(res, tmp_path / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not os.path.isdir(STORIES):
        pytest.skip("../shared is not present")
    tmp = tmp_path_factory.mktemp("stream_dist")
    damaged = _damage(tmp_path_factory.mktemp("damaged"))
    _calib_file(tmp)
    ports = [free_port() for _ in range(len(damaged) + 2 * len(METHODS) + 4)]
    procs, res = spawn_ranks(_worker, lambda r: (r, ports, str(tmp), damaged), str(tmp))
    assert res[0] is not None and "crash" not in res[0], res[0]
    assert res[1] is not None and "crash" not in res[1], res[1]
    return res, tmp, damaged, procs


def _one_process(argv: list[str]) -> tuple[int, str]:
    """The same command in this process, one thread (as each rank), streamed."""
    from binllm.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        torch.set_num_threads(threads)
    return code, err.getvalue()


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.glob("*.safetensors"))}


@pytest.mark.parametrize("method", METHODS)
def test_streamed_torchrun_codes_equal_in_memory_torchrun_bit_for_bit(ranks, method):
    """The default `--dist-calib split`: streaming changes where a layer's weights come from,
    not one operation of the calibration, the Hessian reduce or the solve, so the saved files
    of the streamed and the `--no-stream` torchrun runs are the same bytes. Both ranks read
    the checkpoint one decoder layer at a time (only rank 0 writes, so only rank 0 reads the
    tensors outside the layers back at the end: the final norm and lm_head for its files)."""
    res, tmp, _, _ = ranks
    for r in (0, 1):
        assert res[r][method, "streamed"][0] == 0 and res[r][method, "memory"][0] == 0
        reads = res[r][method, "streamed", "reads"]
        layers = [["0"], ["1"], ["2"], ["3"], ["4"]]
        first, last = reads.index(["0"]), reads.index(["4"])
        assert reads[first:last + 1] == layers and [x for x in reads if x] == layers
        assert len(reads) - last - 1 == (r == 0)  # rank 0 alone reads the tail back
        assert res[r][method, "memory", "reads"] == []
    streamed, memory = _files(tmp / f"{method}_streamed"), _files(tmp / f"{method}_memory")
    assert streamed and streamed == memory


def test_streamed_torchrun_relates_to_one_process_as_in_memory_torchrun(ranks, tmp_path):
    """As tests/test_distributed.py states for the in-memory path: `--dist-calib replicated`
    runs every window on every rank with one process's addmm order, so its files equal a
    single-process streamed run's (same 1 thread per process) byte for byte; `split` adds
    partial Hessians in another order (fp32 round-off), so near-tie billm codes flip — fewer
    than 1% of the stored elements, the bound test_distributed asserts."""
    res, tmp, _, _ = ranks
    assert res[0]["replicated"][0] == 0
    assert _one_process(_argv(STORIES, tmp_path / "one", calib=tmp / "calib.txt"))[0] == 0
    one = _files(tmp_path / "one")
    assert _files(tmp / "replicated") == one
    a = load_file(str(tmp / "billm_streamed" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = sum(int((a[k] != b[k]).sum()) if a[k].shape == b[k].shape else b[k].numel()
               for k in b)
    assert diff < 0.01 * sum(t.numel() for t in b.values())


@pytest.mark.parametrize("kind,needles", [("missing", ["is not in", "copy the whole"]),
                                          ("truncated", ["truncated"]),
                                          ("no_key", ["model.layers.3.mlp.down_proj.weight",
                                                      "in no shard"])])
def test_a_damaged_checkpoint_stops_every_rank_with_the_single_process_error(
        ranks, tmp_path, kind, needles):
    """Every rank checks the checkpoint before any work and raises the same error (no rank
    waits at a collective); rank 0 prints it in the line one process prints."""
    res, tmp, damaged, _ = ranks
    code, err = _one_process(_argv(damaged[kind], tmp_path / "out", calib=tmp / "calib.txt"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert all(n in err for n in needles), err
    assert res[0][kind][:2] == (2, err)
    assert res[1][kind][0] == 2 and res[1][kind][1] == ""  # rank 0 prints every rank's error
    assert f"binllm: error: {res[1][kind][2].partition(': ')[2]}\n" == err  # same error raised
    assert not list(tmp.glob(f"*out_{kind}*"))  # nothing written, no temporary left


def test_an_interrupted_streamed_run_resumes_on_two_ranks(ranks):
    """Ctrl-C on rank 0 after two layers: rank 1 loses contact; the same command then
    restores the two journaled layers (rank 0 shares them), streams the rest, and saves the
    files of the uninterrupted run."""
    res, tmp, _, _ = ranks
    code, err, _, _ = res[0]["interrupted"]
    assert code == 130 and "finished layers are kept" in err, err
    code, err, _, _ = res[1]["interrupted"]
    assert code == 2 and "lost contact" in err and len(err.strip().splitlines()) == 1, err
    assert res[0]["resumed"][0] == 0 and res[1]["resumed"][0] == 0
    assert "resuming: 2 layers restored" in res[0]["resumed"][3]
    assert _files(tmp / "resumed") == _files(tmp / "replicated")


def test_a_killed_rank_ends_the_run_publishing_nothing_and_the_journal_resumes(ranks):
    res, tmp, _, procs = ranks
    assert procs[1].exitcode == 3 and "killed" not in res[1]
    code, err, _, _ = res[0]["killed"]
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "rank 0 lost contact" in err and "--resume-dir" in err
    assert sorted(p.name for p in tmp.iterdir() if "killed" in p.name) == []  # no out, no tmp
    assert len(list((tmp / "journal").glob("layer_*.safetensors"))) == 2
    code, _ = _one_process(_argv(STORIES, tmp / "killed", "--resume-dir", tmp / "journal",
                                    calib=tmp / "calib.txt"))
    assert code == 0
    assert _files(tmp / "killed") == _files(tmp / "replicated")  # = one process, replicated
