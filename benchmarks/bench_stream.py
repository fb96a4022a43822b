"""Issue 11 benchmark: peak memory of `binllm quantize` streaming a checkpoint layer by layer.

A synthetic LLaMA (hidden 2048, intermediate 5632, 16 layers, 16 heads, vocab 50304 so that
the bf16 checkpoint is over 2 GB; random init) is saved with save_pretrained(max_shard_size=
"500MB") into a temporary folder outside the repository (deleted at the end), with the GPT-2
tokenizer of ../shared/tokenizers. Every measured command runs in its own child process started
from this small parent (which imports neither torch nor transformers, so no child inherits a
large high-water mark); the child runs `binllm.cli.main(argv)` and reports its peak RSS
(VmHWM of /proc/self/status, and ru_maxrss) plus VmRSS/VmHWM after every decoder layer.

Runs: the imports alone (python + torch + transformers + binllm); the baseline (the same plus
what the command does before touching the model: the tokenizer, the calibration text read and
tokenized, the windows cut); rtn-sign streamed with
--out; `binllm eval` of that directory (perplexity from the packed layers); rtn-sign in memory
(--no-stream) for comparison (its files must equal the streamed ones); billm streamed. BiLLM's
searches take minutes per decoder layer on this shared 2-core CPU (4 minutes in the recorded
run, 2.5-10 minutes per matrix in earlier timings under heavier load), so by default the billm
run stops after `--billm-layers 1` layers (the per-layer working set is the same for every
layer, as the rtn-sign trace over all 16 layers shows); `--billm-layers 0` runs it to the end.

Target (issue 11): peak RSS < baseline + embeddings + lm_head + 3 decoder layers (bf16) +
calibration activations (layer inputs and outputs, bf16). The child resets its VmHWM once
layer 0's inputs are captured (/proc/self/clear_refs), so the phase before the layers and the
layers' phase are reported apart. The extrapolation to LLaMA-3-8B and -70B shapes fits the
layers' phase as baseline + activations + a·layer + b·hessians (layer = one decoder layer in
bf16, hessians = the fp32 XᵀX of the layer's distinct linear inputs: q/k/v share one, gate/up
one): a from rtn-sign (no Hessian), b from billm; the whole run's peak is the larger of that
and baseline + embeddings + lm_head (read back at the end for the files).

    python benchmarks/bench_stream.py [--nsamples 16] [--seqlen 256] [--billm-layers 1]
    python benchmarks/bench_stream.py --from-json benchmarks/results/stream.json  (md only)
Writes benchmarks/results/stream.json and stream.md.
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
OUT = ROOT / "benchmarks" / "results"
MB = 2**20
SYNTH = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, vocab_size=50304,
             tie_word_embeddings=False, max_position_embeddings=2048)
SHAPES = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab, tied)
    "LLaMA-3-8B": (4096, 14336, 32, 32, 8, 128256, False),
    "LLaMA-3-70B": (8192, 28672, 80, 64, 8, 128256, False),
}

MAKE = r"""
import json, sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
path, tok, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.manual_seed(0)
config = LlamaConfig(**cfg, dtype="bfloat16")
with torch.device("cpu"):
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
model.save_pretrained(path, max_shard_size="500MB")
AutoTokenizer.from_pretrained(tok).save_pretrained(path)
"""

RUN = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(2)
import transformers, safetensors.torch, transformers.models.llama.modeling_llama
import binllm, binllm.cli, binllm.engine.binarize, binllm.engine.stream
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
spec = json.loads(sys.argv[1])
trace, t0 = [], time.perf_counter()
class Stop(Exception):
    pass
def wrap(real):
    def binarize_model(*args, on_layer=None, **kw):
        def hook(done, total):
            trace.append({"layer": done, "seconds": round(time.perf_counter() - t0, 1),
                          "rss_mb": round(status("VmRSS")), "hwm_mb": round(status("VmHWM"))})
            print(f"layer {done}/{total}: {trace[-1]}", file=sys.stderr, flush=True)
            if on_layer:
                on_layer(done, total)
            if spec.get("stop_after") and done >= spec["stop_after"]:
                raise Stop
        return real(*args, on_layer=hook, **kw)
    return binarize_model
phase = {}
real_captured = binllm.engine.stream.LayerStream.captured
def captured(self, model):  # layer 0's inputs exist: the high-water mark so far, then reset
    real_captured(self, model)
    phase["before_layers_hwm_mb"] = status("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here on: the layers (and the end)
binllm.engine.stream.LayerStream.captured = captured
binllm.engine.binarize.binarize_model = wrap(binllm.engine.binarize.binarize_model)
binllm.engine.stream.binarize_model = wrap(binllm.engine.stream.binarize_model)
rc, stopped = None, False
if spec.get("calib"):  # the command's fixed work: tokenizer, calibration text, windows
    from transformers import AutoTokenizer
    from binllm.evaluation.data import calibration_batches, load_text
    path, n, s = spec["calib"]
    batches = calibration_batches(load_text("wikitext2", "validation"),
                                  AutoTokenizer.from_pretrained(path), n, s, 0)
if spec["argv"]:
    try:
        rc = binllm.cli.main(spec["argv"])
    except Stop:
        stopped = True
after = status("VmHWM")
print("RESULT " + json.dumps({
    "rc": rc, "stopped": stopped, "seconds": round(time.perf_counter() - t0, 1),
    "hwm_mb": max(after, phase.get("before_layers_hwm_mb", 0)),
    "before_layers_hwm_mb": phase.get("before_layers_hwm_mb"),
    "layers_hwm_mb": after if phase else None,
    "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "layers": trace}))
"""


def child(code: str, *args: str, log: str) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    print(f"[{time.strftime('%H:%M:%S')}] {log}", flush=True)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or (code is RUN and not lines):
        sys.exit(f"{log} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][7:]) if lines else {}
    if out.get("rc") not in (None, 0):
        sys.exit(f"{log}: binllm exited {out['rc']}:\n{proc.stderr[-3000:]}")
    out["stdout"] = [ln for ln in proc.stdout.splitlines() if not ln.startswith("RESULT ")]
    return out


def sizes(hidden, inter, layers, heads, kv, vocab, tied, nsamples, seqlen) -> dict:
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv * head_dim      # q, o + k, v
    layer_params = attn + 3 * hidden * inter + 2 * hidden         # + gate, up, down, 2 norms
    embed = vocab * hidden * (1 if tied else 2)
    # fp32 XᵀX per input tensor, as collect_hessians shares them: q/k/v, o, gate/up, down
    hessians = 4 * (3 * hidden * hidden + inter * inter)
    return {"layer_mb": layer_params * 2 / MB, "embed_head_mb": embed * 2 / MB,
            "checkpoint_mb": (layers * layer_params + embed + hidden) * 2 / MB,
            "hessians_mb": hessians / MB,
            "activations_mb": 2 * nsamples * seqlen * hidden * 2 / MB}


def _shape(c: dict) -> tuple:
    return (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
            c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"],
            c["tie_word_embeddings"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--billm-layers", type=int, default=1, help="0: the whole model")
    ap.add_argument("--skip-in-memory", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="a 2-layer hidden-128 model, results under /tmp (checks the script)")
    ap.add_argument("--from-json", metavar="FILE",
                    help="rewrite the markdown from a stream.json of an earlier run (no runs)")
    args = ap.parse_args()
    if args.from_json:
        return report(json.loads(Path(args.from_json).read_text()))
    if args.smoke:
        global OUT
        OUT = Path(tempfile.gettempdir()) / "bench_stream_smoke"
        SYNTH.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
    tmp = Path(tempfile.mkdtemp(prefix="binllm-bench-stream-"))
    model = tmp / "synthetic-llama"
    common = ["-q", "quantize", str(model), "--calib", "wikitext2", "--calib-split",
              "validation", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
              "--eval", ""]
    results: dict = {"config": SYNTH, "nsamples": args.nsamples, "seqlen": args.seqlen,
                     "machine": f"{platform.processor() or platform.machine()}, "
                                f"{os.cpu_count()} cores (shared)", "runs": {}}
    try:
        child(MAKE, str(model), str(SHARED / "tokenizers" / "gpt2"), json.dumps(SYNTH),
              log="saving the synthetic model")
        shards = sorted(model.glob("*.safetensors"))
        results["checkpoint_bytes"] = sum(f.stat().st_size for f in shards)
        results["shards"] = len(shards)
        runs = results["runs"]
        runs["imports only"] = child(RUN, json.dumps({"argv": []}), log="baseline (imports)")
        runs["baseline"] = child(
            RUN, json.dumps({"argv": [], "calib": [str(model), args.nsamples, args.seqlen]}),
            log="baseline (imports, tokenizer, calibration windows)")
        runs["rtn-sign streamed"] = child(
            RUN, json.dumps({"argv": [*common, "--method", "rtn-sign", "--out",
                                      str(tmp / "rtn")]}), log="rtn-sign, streamed")
        runs["eval of the packed dir"] = child(
            RUN, json.dumps({"argv": ["-q", "eval", str(tmp / "rtn"), "--datasets", "wikitext2",
                                      "--seqlen", str(args.seqlen), "--max-windows", "4"]}),
            log="binllm eval of the streamed rtn-sign directory")
        if not args.skip_in_memory:
            runs["rtn-sign in memory"] = child(
                RUN, json.dumps({"argv": [*common, "--method", "rtn-sign", "--no-stream",
                                          "--out", str(tmp / "rtn-mem")]}),
                log="rtn-sign, in memory (--no-stream)")
            results["in_memory_files_identical"] = all(
                (tmp / "rtn" / f.name).read_bytes() == f.read_bytes()
                for f in sorted((tmp / "rtn-mem").glob("*.safetensors")))
            shutil.rmtree(tmp / "rtn-mem")
        stop = args.billm_layers or None
        runs["billm streamed"] = child(
            RUN, json.dumps({"argv": [*common, "--method", "billm", "--out", str(tmp / "billm")],
                             "stop_after": stop}),
            log=f"billm, streamed ({f'stopped after {stop} layer(s)' if stop else 'all layers'})")
        results["billm_out_published"] = (tmp / "billm").exists()
        results["billm_temporaries_left"] = [p.name for p in tmp.iterdir()
                                             if p.name.startswith(".billm")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results)


def _layers_peak(run: dict) -> float:
    """VmHWM after the last layer: the layers' phase when the capture reset it (streamed)."""
    return run["layers"][-1]["hwm_mb"] if run.get("layers") else run["hwm_mb"]


def report(res: dict) -> None:
    runs, c = res["runs"], res["config"]
    n, s = res["nsamples"], res["seqlen"]
    synth = sizes(*_shape(res["config"]), n, s)
    base = runs["baseline"]["hwm_mb"]
    target = base + synth["embed_head_mb"] + 3 * synth["layer_mb"] + synth["activations_mb"]
    # the layers' phase: VmHWM reset once layer 0's inputs are captured (the embeddings and
    # lm_head are dropped then), read after the last layer, before the head is read back
    fixed = base + synth["activations_mb"]
    a = (_layers_peak(runs["rtn-sign streamed"]) - fixed) / synth["layer_mb"]
    b = (_layers_peak(runs["billm streamed"]) - fixed - a * synth["layer_mb"]) \
        / synth["hessians_mb"]
    res.update(target_mb=target, fit={"a_layers": a, "b_hessians": b})
    ckpt_mb = res["checkpoint_bytes"] / MB
    lines = [
        "# Streaming a checkpoint layer by layer: peak memory (issue 11)", "",
        f"`python benchmarks/bench_stream.py` on {res['machine']}. Synthetic LLaMA "
        f"(hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, "
        f"{c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, vocab "
        f"{c['vocab_size']}, untied lm_head, bf16, random init), "
        f"saved in {res['shards']} shards of ≤ 500 MB: **{ckpt_mb:.0f} MiB** on disk; one "
        f"decoder layer {synth['layer_mb']:.0f} MiB, embeddings + lm_head "
        f"{synth['embed_head_mb']:.0f} MiB. Calibration {n} × {s} tokens of wikitext2 "
        f"validation (layer inputs + outputs in bf16: {synth['activations_mb']:.0f} MiB). "
        "Peak RSS = VmHWM of each child process.", "",
        "| run | peak RSS (MiB) | before the layers | during the layers | vs checkpoint | "
        "in decoder layers | seconds |",
        "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        note = " (stopped after layer %d)" % r["layers"][-1]["layer"] if r.get("stopped") else ""
        pre = r.get("before_layers_hwm_mb")
        lay = _layers_peak(r) if pre is not None and r.get("layers") else None
        lines.append(f"| {name}{note} | {r['hwm_mb']:.0f} | "
                     f"{'' if pre is None else f'{pre:.0f}'} | "
                     f"{'' if lay is None else f'{lay:.0f}'} | {r['hwm_mb'] / ckpt_mb:.2f} | "
                     f"{r['hwm_mb'] / synth['layer_mb']:.1f} | {r['seconds']:.0f} |")
    lines += ["", "Before the layers: the high-water mark up to the capture of layer 0's inputs "
              "(imports, tokenizer, calibration windows, embeddings; the final norm and lm_head "
              "are not read then). During the layers: reset after the capture, read after the "
              "last layer (the embeddings and lm_head are dropped meanwhile; the peak column "
              "also covers the end, when they are read back for the files)."]
    lines += ["", f"Target: baseline {base:.0f} + embeddings and lm_head "
              f"{synth['embed_head_mb']:.0f} + 3 layers {3 * synth['layer_mb']:.0f} + "
              f"activations {synth['activations_mb']:.0f} = **{target:.0f} MiB** "
              f"({target / ckpt_mb:.2f} of the checkpoint)."]
    if "in_memory_files_identical" in res:
        lines.append(f"Streamed and in-memory rtn-sign files byte-identical: "
                     f"{res['in_memory_files_identical']}.")
    stopped = runs["billm streamed"].get("stopped")
    lines.append(f"billm {'stopped early' if stopped else 'ran every layer'}: output directory "
                 f"published "
                 f"{res['billm_out_published']}, temporaries left "
                 f"{res['billm_temporaries_left'] or 'none'}.")
    lines += ["", "Per-layer trace of the streamed runs (VmRSS / VmHWM after each layer, MiB):", ""]
    for name in ("rtn-sign streamed", "billm streamed"):
        layers = runs[name]["layers"]
        trace = ", ".join(f"{t['layer']}: {t['rss_mb']}/{t['hwm_mb']}" for t in layers)
        per = [b["seconds"] - a["seconds"] for a, b in zip(layers, layers[1:])]
        speed = (f" (seconds per layer after the first: mean {sum(per) / len(per):.0f}, "
                 f"min {min(per):.0f}, max {max(per):.0f})" if per else "")
        lines.append(f"- {name}: {trace}{speed}")
    lines += ["", "Extrapolation (peak ≈ max(baseline + embeddings + lm_head, baseline + "
              f"activations + a·layer + b·hessians), a = {a:.2f} from rtn-sign, b = {b:.2f} "
              "from billm during the layers; bf16 weights, fp32 Hessians of one layer, "
              "without --eval / --compare-fp):", "",
              "| shape | checkpoint (GiB) | layer (GiB) | Hessians (GiB) | peak, "
              f"{n}×{s} calib (GiB) | peak, 128×2048 calib (GiB) |", "|---|---|---|---|---|---|"]
    extrap = {}
    for name, shape in {**SHAPES, "synthetic (this run)": _shape(res["config"])}.items():
        row = []
        for ns, sl in ((n, s), (128, 2048)):
            z = sizes(*shape, ns, sl)
            row.append(max(base + z["embed_head_mb"], base + z["activations_mb"]
                           + a * z["layer_mb"] + b * z["hessians_mb"]))
        z = sizes(*shape, n, s)
        extrap[name] = {**z, "peak_mb": row[0], "peak_128x2048_mb": row[1]}
        lines.append(f"| {name} | {z['checkpoint_mb'] / 1024:.1f} | {z['layer_mb'] / 1024:.2f} | "
                     f"{z['hessians_mb'] / 1024:.2f} | {row[0] / 1024:.1f} | {row[1] / 1024:.1f} |")
    res["extrapolation"] = extrap
    for r in runs.values():
        r.pop("stdout", None)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "stream.json").write_text(json.dumps(res, indent=2))
    (OUT / "stream.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
