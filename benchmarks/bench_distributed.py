"""Issue 11 §2 benchmark: `binllm quantize` in one process against `torchrun` with 2 ranks.

A synthetic LLaMA (random init, saved under /tmp, never in the repository; default hidden
1024, intermediate 2816, 8 layers, 16 heads, vocab 512 with stories260K's tokenizer) is
binarized from the command line, each run in a fresh process:

    1 process,  OMP_NUM_THREADS=2           (both cores to one process)
    1 process,  OMP_NUM_THREADS=1           (the kernels the ranks run)
    2 ranks,    OMP_NUM_THREADS=1 per rank  --dist-calib split       (gloo, torchrun)
    2 ranks,    OMP_NUM_THREADS=1 per rank  --dist-calib replicated

Recorded: wall seconds of the whole command, the binarization seconds the report states,
the peak memory it states (max over ranks), and how the saved tensors compare with the
single-process run with one thread (replicated: identical bytes expected; split: the fraction
of differing elements; the 1- and 2-thread single processes are compared too, since BLAS
kernels with other thread counts round differently). Speed-ups are against the 2-thread
single process (both cores in every case). The machine is shared, so the load average is
recorded before and after; the ratio of the times is what counts. The plan for 8 GPUs
(collectives and data volumes per decoder layer of LLaMA-2-70B) is computed from the shapes
and written into the markdown.

    python benchmarks/bench_distributed.py [--hidden 1024 --layers 8 --nsamples 16 --seqlen 256]

`--streaming` instead measures torchrun runs that stream the checkpoint (the default for a local
safetensors directory): bench_stream.py's synthetic model (hidden 2048, 16 layers, 1961 MiB in
5 shards), `--method rtn-sign` over all layers and `--method billm` stopped after
`--billm-layers` layers, each in 1 process (2 threads) and in 2 ranks (1 thread each). Every
process is started through a small probe that runs `binllm.cli.main` and records its own
peak RSS (VmHWM) and the time at which each layer finished, so the peak is per rank.
`--streaming --smoke`: a 2-layer hidden-128 model, results under /tmp (checks the script).
Writes benchmarks/results/distributed.json and distributed.md (--streaming: the "streaming"
part of the JSON and its section of the markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
OUT = ROOT / "benchmarks" / "results"


def make_model(path: Path, hidden: int, intermediate: int, layers: int, heads: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=512, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200MB")
    for f in STORIES.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path / f.name)


def run(label: str, cmd: list[str], threads: int, tmp: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((tmp / f"{label}.json").read_text())
    q = report["quantization"]
    row = {"label": label, "threads_per_process": threads, "wall_s": round(wall, 2),
           "binarize_s": round(q["seconds"], 2), "peak_memory_mb": round(q["peak_memory_mb"]),
           "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
           "command": " ".join(cmd)}
    print(f"{label}: wall {wall:.1f} s, binarize {q['seconds']:.1f} s, "
          f"peak {q['peak_memory_mb']:.0f} MiB, load {load_before:.1f} -> "
          f"{row['load_after']:.1f}", flush=True)
    return row


def compare(a: Path, b: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    ta, tb = {}, {}
    for f in sorted(a.glob("*.safetensors")):
        ta.update(load_file(str(f)))
    for f in sorted(b.glob("*.safetensors")):
        tb.update(load_file(str(f)))
    assert ta.keys() == tb.keys()
    reshaped = [k for k in ta if ta[k].shape != tb[k].shape]  # e.g. another salient count
    diff = sum(int((ta[k] != tb[k]).sum()) for k in ta if k not in reshaped)
    total = sum(ta[k].numel() for k in ta)
    return {"identical": not reshaped and all(torch.equal(ta[k], tb[k]) for k in ta),
            "differing_elements": diff, "elements": total, "tensors": len(ta),
            "tensors_of_another_shape": len(reshaped)}


def plan_70b(world: int = 8) -> dict:
    """Per decoder layer of LLaMA-2-70B (d 8192, intermediate 28672, 64 heads, 8 KV heads)."""
    d, inter, kv = 8192, 28672, 1024
    shapes = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
              "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
    from binllm.engine.distributed import assign_owners, linear_cost

    costs = {n: linear_cost(*s) for n, s in shapes.items()}
    owners = assign_owners(costs, world)
    loads = [sum(c for n, c in costs.items() if owners[n] == r) for r in range(world)]
    hess_fp64 = sum(s[1] ** 2 * 8 for s in shapes.values())
    # one H per distinct input (q/k/v, o, gate/up, down)
    distinct = d * d * 3 * 8 + inter * inter * 8
    weights = sum(r * c for r, c in shapes.values())
    return {"world": world, "owners": owners,
            "solve_speedup_bound": round(sum(costs.values()) / max(loads), 2),
            "largest_share": round(max(loads) / sum(costs.values()), 3),
            "hessian_reduce_bytes_fp64": hess_fp64,
            "hessian_reduce_bytes_fp64_distinct_inputs": distinct,
            "codes_broadcast_bytes_at_3_bits": int(weights * 3 / 8),
            "weights_per_layer": weights}


# ---- --streaming: torchrun runs that stream the checkpoint, peak RSS per rank ---------------
PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter()
import binllm.cli, binllm.engine.stream
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
out, stop = sys.argv[1], int(sys.argv[2])
class Stop(Exception):
    pass
layers = []
real = binllm.engine.stream.binarize_model
def binarize_model(*args, on_layer=None, **kw):
    def hook(done, total):
        layers.append({"layer": done, "seconds": round(time.perf_counter() - t0, 1),
                       "hwm_mb": round(hwm())})
        if on_layer:
            on_layer(done, total)
        if stop and done >= stop:
            raise Stop
    return real(*args, on_layer=hook, **kw)
binllm.engine.stream.binarize_model = binarize_model
rc, stopped = None, False
try:
    rc = binllm.cli.main(sys.argv[3:])
except Stop:
    stopped = True
rank = os.environ.get("RANK", "0")
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": int(rank), "rc": rc, "stopped": stopped, "hwm_mb": round(hwm()),
               "seconds": round(time.perf_counter() - t0, 1), "layers": layers}, f)
sys.exit(rc or 0)
"""


def stream_run(label: str, ranks: int, argv: list[str], stop: int, tmp: Path, port: int) -> dict:
    """One streamed command through PROBE: wall seconds and every rank's probe record."""
    probe, records = tmp / "probe.py", tmp / f"{label}.ranks"
    probe.write_text(PROBE)
    shutil.rmtree(records, ignore_errors=True)
    records.mkdir()
    py = sys.executable
    launch = [py] if ranks == 1 else [py, "-m", "torch.distributed.run",
                                      f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
                                      f"--master_port={port}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // ranks), "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([*launch, str(probe), str(records), str(stop), *argv],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    found = sorted(records.glob("rank*.json"))
    if proc.returncode != 0 or len(found) != ranks or any(
            json.loads(f.read_text())["rc"] not in (0, None) for f in found):
        raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    row = {"label": label, "ranks": ranks, "threads_per_process": 2 // ranks,
           "wall_s": round(wall, 1), "load_before": round(load_before, 2),
           "load_after": round(os.getloadavg()[0], 2),
           "per_rank": [json.loads(f.read_text()) for f in found],
           "command": " ".join([*launch, "PROBE", *argv])}
    print(f"{label}: wall {wall:.1f} s, peak RSS per rank "
          f"{[r['hwm_mb'] for r in row['per_rank']]} MiB", flush=True)
    return row


def streaming(args) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_stream import MAKE, SYNTH, child

    global OUT
    if args.smoke:
        SYNTH.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
        smoke = Path(tempfile.gettempdir()) / "bench_distributed_smoke"
        smoke.mkdir(exist_ok=True)
        if (OUT / "distributed.json").exists():
            shutil.copy(OUT / "distributed.json", smoke / "distributed.json")
        OUT = smoke
    tmp = Path(tempfile.mkdtemp(prefix="binllm-bench-dist-stream-"))
    model = tmp / "synthetic-llama"
    try:
        child(MAKE, str(model), str(SHARED / "tokenizers" / "gpt2"), json.dumps(SYNTH),
              log="saving the synthetic model")
        ckpt = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        common = ["-q", "quantize", str(model), "--calib", "wikitext2", "--calib-split",
                  "validation", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                  "--eval", "", "--overwrite", "--data-dir", str(SHARED / "data")]
        rows, port = [], 29741
        for method, stop in (("rtn-sign", 0), ("billm", args.billm_layers)):
            if method not in args.stream_methods.split(","):
                continue
            for ranks in (1, 2):
                label = f"{method}_{ranks}_rank{'s' if ranks > 1 else ''}"
                port += 1
                rows.append(stream_run(label, ranks, [*common, "--method", method, "--out",
                                                      str(tmp / label)], stop, tmp, port))
                rows[-1].update(method=method, stopped_after=stop or None,
                                published=(tmp / label).exists())
        if rows[0]["method"] == "rtn-sign":
            rows[1]["files_vs_1_rank"] = compare(tmp / rows[0]["label"], tmp / rows[1]["label"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = OUT / "distributed.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    fresh = {r["label"] for r in rows}  # runs of methods not measured now are kept
    kept = [r for r in result.get("streaming", {}).get("runs", []) if r["label"] not in fresh]
    order = ["rtn-sign", "billm"]
    result["streaming"] = {"model": {**SYNTH, "checkpoint_mb": round(ckpt / 2**20)},
                           "nsamples": args.nsamples, "seqlen": args.seqlen,
                           "cpus": os.cpu_count(),
                           "runs": sorted(kept + rows, key=lambda r: (order.index(r["method"]),
                                                                      r["ranks"]))}
    path.write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "distributed.md").write_text(markdown(result))
    print(f"wrote {OUT / 'distributed.md'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--method", default="billm")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--tmp", default="/tmp/binllm_bench_distributed")
    ap.add_argument("--streaming", action="store_true",
                    help="torchrun streaming runs of bench_stream.py's model (module docstring)")
    ap.add_argument("--smoke", action="store_true", help="--streaming on a tiny model, into /tmp")
    ap.add_argument("--stream-methods", default="rtn-sign,billm",
                    help="--streaming: which of rtn-sign,billm to run (the others' rows are kept)")
    ap.add_argument("--billm-layers", type=int, default=1,
                    help="--streaming: billm runs stop after this many layers")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite distributed.md from distributed.json")
    args = ap.parse_args()
    if args.markdown_only:
        (OUT / "distributed.md").write_text(markdown(json.loads(
            (OUT / "distributed.json").read_text())))
        return
    if args.streaming:
        streaming(args)
        return

    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    model = tmp / f"llama_h{args.hidden}_l{args.layers}"
    make_model(model, args.hidden, args.intermediate, args.layers, args.heads)
    size_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    py = sys.executable
    common = [str(model), "--method", args.method, "--calib", "wikitext2", "--calib-split",
              "validation", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
              "--eval", "", "--data-dir", str(SHARED / "data"), "--overwrite"]
    rows = []
    for label, threads, extra, ranks in [("one_process", 2, [], 1),
                                         ("one_process_1_thread", 1, [], 1),
                                         ("two_ranks_split", 1, ["--dist-calib", "split"], 2),
                                         ("two_ranks_replicated", 1,
                                          ["--dist-calib", "replicated"], 2)]:
        launch = [py, "-m", "binllm"] if ranks == 1 else [
            py, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1", "--master_port=29733", "-m", "binllm"]
        cmd = [*launch, "-q", "quantize", *common, *extra, "--out", str(tmp / label),
               "--report", str(tmp / f"{label}.json")]
        rows.append(run(label, cmd, threads, tmp))
    for row in rows[1:]:  # codes against the single process with the same threads per process
        if row["label"] != "one_process_1_thread":
            row["vs_one_process"] = compare(tmp / "one_process_1_thread", tmp / row["label"])
        row["speedup"] = round(rows[0]["binarize_s"] / row["binarize_s"], 2)
    rows[1]["vs_one_process_2_threads"] = compare(tmp / "one_process", tmp / rows[1]["label"])
    plan = plan_70b()
    result = {"model": {"path": str(model), "hidden": args.hidden,
                        "intermediate": args.intermediate, "layers": args.layers,
                        "heads": args.heads, "checkpoint_mb": round(size_mb)},
              "method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "runs": rows, "plan_70b_8_gpus": plan}
    previous = OUT / "distributed.json"
    if previous.exists():  # keep the --streaming runs
        kept = json.loads(previous.read_text()).get("streaming")
        if kept:
            result["streaming"] = kept
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "distributed.md").write_text(markdown(result))
    print(f"wrote {OUT / 'distributed.md'}")


def _same(cmp: dict | None) -> str:
    if cmp is None:
        return "—"
    if cmp["identical"]:
        return "identical"
    return (f"{cmp['differing_elements']} / {cmp['elements']} elements differ, "
            f"{cmp['tensors_of_another_shape']} / {cmp['tensors']} tensors of another shape")


def markdown(r: dict) -> str:
    m, p = r["model"], r["plan_70b_8_gpus"]
    gb = 1e9
    lines = [
        "# Several processes: one process against torchrun with 2 ranks (CPU, gloo)", "",
        f"`python benchmarks/bench_distributed.py` — synthetic LLaMA (random init, bf16, "
        f"hidden {m['hidden']}, intermediate {m['intermediate']}, {m['layers']} layers, "
        f"{m['checkpoint_mb']} MB), `--method {r['method']}`, calibration {r['nsamples']} × "
        f"{r['seqlen']} tokens of wikitext2 validation, {r['cpus']} CPU cores shared with "
        "other jobs (load average recorded, far above the core count: every process got a "
        "fraction of a core, so the absolute seconds are inflated; the ratio is what counts). "
        "Speed-up: against the 2-thread single process; codes: the saved tensors against "
        "the 1-thread single process (the ranks run 1 thread each).", "",
        "| run | threads / process | binarize s | wall s | speed-up | peak MiB "
        "| codes vs 1 process, 1 thread | load before → after |",
        "|---|---|---|---|---|---|---|---|"]
    for row in r["runs"]:
        same = _same(row.get("vs_one_process"))
        lines.append(f"| {row['label']} | {row['threads_per_process']} | {row['binarize_s']} | "
                     f"{row['wall_s']} | {row.get('speedup', 1.0)} | {row['peak_memory_mb']} | "
                     f"{same} | {row['load_before']} → {row['load_after']} |")
    lines += [
        "", "One process with 2 threads against one with 1 thread: "
        + _same(r["runs"][1].get("vs_one_process_2_threads")) + " (BLAS rounding depends on "
        "the thread count; bit-identity of `replicated` holds for the same threads per "
        "process).",
        "", "## Plan for 8 GPUs (LLaMA-2-70B, per decoder layer; computed, not measured)", "",
        "`torchrun --nproc_per_node=8 -m binllm quantize MODEL --device cuda ...`: NCCL, rank r "
        "on cuda:r, calibration windows split 8 ways (128 windows → 16 per GPU).", "",
        "Collectives per layer, in this order on every rank:",
        "1. `all_gather_object` of error flags after each local step (a few bytes);",
        "2. `broadcast_object_list` of rank 0's resume decision;",
        "3. `all_gather_object` of the accumulator grouping (which linears share an input), "
        "`all_reduce` of the 4 sample counts (int64); one reduce per distinct input's partial "
        "XᵀX in fp64 (q/k/v and gate/up share one each: `all_reduce` when their owners "
        "differ, `reduce` to the owner otherwise): "
        f"{p['hessian_reduce_bytes_fp64_distinct_inputs'] / gb:.1f} GB per layer (one per "
        f"linear would be {p['hessian_reduce_bytes_fp64'] / gb:.1f} GB); over NVLink "
        "(~300 GB/s effective) well under a second;",
        "4. `all_gather_object` of the layouts and reports, then one `broadcast` per linear of "
        f"its packed codes from its owner: ≈{p['codes_broadcast_bytes_at_3_bits'] / gb:.2f} "
        f"GB per layer at ~3 stored bits/weight ({p['weights_per_layer'] / 1e6:.0f} M weights).",
        "",
        f"Greedy owners (cost rows·cols²): {json.dumps(p['owners'])}. The largest share is "
        f"{p['largest_share']:.0%} of the layer's solve cost (down_proj alone), so the solve "
        f"of one layer speeds up at most {p['solve_speedup_bound']}× however many GPUs there "
        "are; calibration (forward + Hessians) scales with the ranks in `split` mode. "
        "Beyond that needs splitting one linear's solve (its rows are independent given H "
        "only for methods without block-wide salient-column choices), which is not done.",
        "", "Activations stay on their rank (16 windows × 2048 × 8192 × 2 B = 0.5 GB per "
        "GPU per copy); a 70B layer in bf16 is 1.7 GB, so with layer streaming (issue 11 §1) "
        "each GPU holds one layer, its share of the activations and the Hessian sums, one "
        "per distinct input (≈ 4.1 GB fp32; the fp64 reduce goes in chunks of 32 MiB).", ""]
    if "streaming" in r:
        lines += markdown_streaming(r["streaming"]) + [""]
    return "\n".join(lines)


def markdown_streaming(st: dict) -> list[str]:
    """The section of the --streaming runs and the per-GPU memory plan for 8B and 70B."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_stream import SHAPES, sizes

    m = st["model"]
    lines = [
        "", "## torchrun streaming the checkpoint (CPU, gloo)", "",
        f"`python benchmarks/bench_distributed.py --streaming` — bench_stream.py's synthetic "
        f"LLaMA (hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, "
        f"{m['num_hidden_layers']} layers, vocab {m['vocab_size']}, bf16, "
        f"{m['checkpoint_mb']} MiB), calibration {st['nsamples']} × {st['seqlen']} tokens; every "
        "rank streams the layers from the shards, rank 0 alone writes `--out`. 1 rank = one "
        "process with 2 threads, 2 ranks = torchrun with 1 thread each (both use the 2 shared "
        "cores). Peak RSS: VmHWM of each rank's process; seconds per rank: from the start of "
        "its process to its end (or its stop after `--billm-layers` billm layers), imports and "
        "calibration data included.", "",
        "| run | ranks | wall s | seconds per rank | peak RSS per rank (MiB) "
        "| rank 0: layers done at (s) | load before → after |",
        "|---|---|---|---|---|---|---|"]
    for row in st["runs"]:
        ranks = row["per_rank"]
        shown = ranks[0]["layers"]
        shown = shown if len(shown) <= 3 else [shown[0], shown[1], None, shown[-1]]
        trace = ", ".join("…" if t is None else f"{t['layer']}: {t['seconds']}" for t in shown)
        stop = f" (stopped after {row['stopped_after']})" if row.get("stopped_after") else ""
        lines.append(f"| {row['label']}{stop} | {row['ranks']} | {row['wall_s']} | "
                     f"{' / '.join(str(r['seconds']) for r in ranks)} | "
                     f"{' / '.join(str(r['hwm_mb']) for r in ranks)} | {trace} | "
                     f"{row['load_before']} → {row['load_after']} |")
    if st.get("note"):
        lines += ["", f"Note: {st['note']}"]
    by = {(r["method"], r["ranks"]): r for r in st["runs"]}
    for method in ("rtn-sign", "billm"):
        one, two = by.get((method, 1)), by.get((method, 2))
        if one and two:
            peaks = [r["hwm_mb"] for r in two["per_rank"]]
            lines += ["", f"{method}: wall seconds 1 rank / 2 ranks = {one['wall_s']} / "
                      f"{two['wall_s']} = {one['wall_s'] / two['wall_s']:.2f}×; peak RSS "
                      f"{one['per_rank'][0]['hwm_mb']} MiB in one process, {max(peaks)} MiB on "
                      f"the larger rank and {sum(peaks)} MiB over both (each rank holds its "
                      "own process baseline, the current layer and, in `split` mode, every "
                      "Hessian of the layer until the reduce; the embeddings until the "
                      "capture, the lm_head on rank 0 alone at the end; the calibration "
                      "activations and the solve are divided)."]
    cmp = next((r["files_vs_1_rank"] for r in st["runs"] if "files_vs_1_rank" in r), None)
    if cmp is not None:
        lines += ["", f"rtn-sign saved files, 2 ranks against 1: {_same(cmp)} (rtn-sign uses no "
                  "Hessian, so splitting the windows cannot change a code)."]
    lines += [
        "", "## Plan for 8 GPUs with streaming (computed, not measured; NCCL was not run here, "
        "this machine has no GPU)", "",
        "`torchrun --nproc_per_node=8 -m binllm quantize DIR --device cuda --nsamples 128 "
        "--seqlen 2048 ...`, `--dist-calib split`: each GPU holds the current decoder layer "
        "(every rank runs the whole layer on its 16 windows), the inputs and outputs of its 16 "
        "windows, the fp32 XᵀX of each distinct input of the layer (q/k/v and gate/up share "
        "one; split: each rank sums all of them over its windows) and, during the reduce, a "
        "32 MiB fp64 chunk. The solve of the linears a rank owns then needs H, its inverse and "
        "a few fp32 copies of W on top (not counted). Host RAM per rank: the process baseline, "
        "the embeddings until layer 0's inputs are captured, the layer being read; rank 0 "
        "reads the final norm and lm_head at the end.", "",
        "| shape | layer bf16 (GiB) | activations, 16 × 2048 (GiB) | Hessians fp32 (GiB) "
        "| fp64 reduce chunk (GiB) | per GPU, sum (GiB) "
        "| embeddings + lm_head, host, rank 0 at the end (GiB) |",
        "|---|---|---|---|---|---|---|"]
    for name, (hidden, inter, layers, heads, kv, vocab, tied) in SHAPES.items():
        z = sizes(hidden, inter, layers, heads, kv, vocab, tied, 16, 2048)
        fp64 = (1 << 22) * 8 / 2**20  # REDUCE_CHUNK elements in fp64
        total = z["layer_mb"] + z["activations_mb"] + z["hessians_mb"] + fp64
        layer_70b = z["layer_mb"]  # the last shape, LLaMA-3-70B
        lines.append(f"| {name} | {z['layer_mb'] / 1024:.2f} | {z['activations_mb'] / 1024:.2f} | "
                     f"{z['hessians_mb'] / 1024:.2f} | {fp64 / 1024:.2f} | {total / 1024:.1f} | "
                     f"{z['embed_head_mb'] / 1024:.2f} |")
    lines += [
        "", "What NCCL changes (from the code and torch.distributed's documentation, not run): "
        "the tensors of every collective live on cuda:LOCAL_RANK (`from_env` passes "
        "`device_id`), the Hessian reduce and the code broadcasts go over NVLink instead of "
        "loopback TCP, and the object collectives "
        "(error agreement, layouts) are pickled into CUDA tensors. A rank that dies is noticed "
        "differently: gloo's peers get a closed connection at once (the `lost contact` error "
        "measured in the tests); NCCL's peers block until torchrun's agent sees the dead worker "
        "and SIGTERMs them (`stopped by torchrun ...`) or, failing that, until the process-group "
        "timeout (`--dist-timeout`, default 1800 s). Every rank reads every layer from disk: "
        f"8 × {layer_70b / 1024:.2f} GiB per 70B layer, mostly from the page cache on one node "
        "after the first reader; on 8 nodes without a shared cache that is 8 reads of the "
        "checkpoint."]
    return lines


if __name__ == "__main__":
    main()
