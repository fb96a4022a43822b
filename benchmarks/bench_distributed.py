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
single process (both cores in every case). The machine is shared, so the load average is recorded before and after; the
ratio of the times is what counts. The plan for 8 GPUs (collectives and data volumes per
decoder layer of LLaMA-2-70B) is computed from the shapes and written into the markdown.

    python benchmarks/bench_distributed.py [--hidden 1024 --layers 8 --nsamples 16 --seqlen 256]
Writes benchmarks/results/distributed.json and distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
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
    distinct = d * d * 3 * 8 + inter * inter * 8  # one H per distinct input (q/k/v, o, gate/up, down)
    weights = sum(r * c for r, c in shapes.values())
    return {"world": world, "owners": owners,
            "solve_speedup_bound": round(sum(costs.values()) / max(loads), 2),
            "largest_share": round(max(loads) / sum(costs.values()), 3),
            "hessian_reduce_bytes_fp64": hess_fp64,
            "hessian_reduce_bytes_fp64_distinct_inputs": distinct,
            "codes_broadcast_bytes_at_3_bits": int(weights * 3 / 8),
            "weights_per_layer": weights}


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
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite distributed.md from distributed.json")
    args = ap.parse_args()
    if args.markdown_only:
        (OUT / "distributed.md").write_text(markdown(json.loads(
            (OUT / "distributed.json").read_text())))
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
        "| run | threads / process | binarize s | wall s | speed-up | peak MiB | codes vs 1 process, 1 thread | load before → after |",
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
        "3. `all_reduce` of the 7 sample counts (int64); `reduce` of each linear's partial "
        f"XᵀX to its owner in fp64: {p['hessian_reduce_bytes_fp64'] / gb:.1f} GB per layer "
        f"({p['hessian_reduce_bytes_fp64_distinct_inputs'] / gb:.1f} GB if the linears that "
        "share an input — q/k/v, gate/up — shared one reduce, not done yet); over NVLink "
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
        "each GPU holds one layer, its share of the activations and the Hessian sums "
        "(≈ 4.9 GB fp32, plus the fp64 reduce buffer of the widest, 6.6 GB).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
