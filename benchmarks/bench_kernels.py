"""Issue 10 benchmark: CPU kernels on the packed bits against dense bf16 / fp32, on this CPU.

Part 1, one LLaMA-7B-shaped decoder layer's 7 linears (q/k/v/o 4096×4096, gate/up
11008×4096, down 4096×11008), batch 1, `--threads` threads. Each method's codes are synthesised
with the layout it produces (`bench_packed.layout_codes`, from the codes of a small random
layer run through the real method: formats, orders, groups, β, group sizes, PB-LLM's salient
fraction; BiLLM-family layers get 3 salient columns per 128). Packed layers are BinaryLinears
on the default path (the kernel form, `binllm.kernels.cpu`); a packed layer is copied until the
copies exceed 3× the L3 cache, so every pass reads from memory as the dense weights do. Per
configuration: ms per layer forward as the sum over its 7 linears of each call's best time
(over `--repeats` rounds and the copies; calls are timed one by one, the configurations
interleaved within each round, since the CPU is shared with other jobs) and the median of
whole passes; memory held (packed buffers
+ kernel form, against the dense weights), bytes read per token, and the physical limit
bytes / memory bandwidth, the bandwidth measured by copying a 512 MiB tensor (read + write).

Part 2, stories260K end to end, every registered method (real calibration on tinystories):
greedy generation tokens/s of the loaded packed model (default: kernels) against the fp32
original, interleaved best of N, and the tinystories perplexity on the kernel path against the
dequantize path (`kernels=False`), which must agree to 4 significant digits; plus one run of
the `binllm generate` command line.

    python benchmarks/bench_kernels.py [--methods ...] [--skip-stories] [--threads 2]
Writes benchmarks/results/kernels.json and kernels.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, PROMPT, ROOT, STORIES, md_row  # noqa: E402
from _common import stories_inputs  # noqa: E402
from bench_packed import layout_codes  # noqa: E402

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
          "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
          "down_proj": (4096, 11008)}
STACK_METHODS = ["rtn-sign", "q1_0", "binary-factor", "gptq", "billm", "arb-rc", "arb-llm-x",
                 "arb-llm-rc", "pbllm-10"]


def l3_bytes() -> int:
    """This CPU's last-level cache as Linux reports it (32 MiB where it does not say)."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(size.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}[size[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return 32 * 2**20


def bandwidth_gbs() -> float:
    """Best GB/s of copying a 512 MiB fp32 tensor (bytes read + bytes written)."""
    a = torch.ones(128 * 2**20)
    b = torch.empty_like(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(5))
    return 2 * a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def like_codes(method: str):
    """Codes of a small random 16 × 512 layer through the real method (its layout)."""
    from binllm.engine.reconstruct import reconstruct
    from binllm.methods import get_method

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 512, generator=g)
    W = torch.randn(16, 512, generator=g)
    return reconstruct(W, 2 * X.T @ X / X.shape[0], get_method(method), block_size=128).codes


def layer_dir(method: str, work: Path) -> Path:
    """The saved 7B-shaped layer of `method` in `work` (written once, shared by the parts)."""
    d = work / f"layer-{method}"
    return d if (d / "config.json").is_file() else save_layer_dir(method, d)


def save_layer_dir(method: str, out: Path) -> Path:
    """A saved binllm directory of a one-decoder-layer LLaMA of 7B shape (hidden 4096,
    intermediate 11008, 32 heads, vocabulary 32) whose 7 linears hold codes with `method`'s
    layout (`layout_codes`), written by `save_loaded` as any loaded model is re-saved."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from binllm.packed.checkpoint import parameters_on_meta, save_loaded
    from binllm.packed.layers import BinaryLinear

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32,
                      max_position_embeddings=256)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(cfg)
    like = like_codes(method)
    g = torch.Generator().manual_seed(1)
    layer = model.model.layers[0]
    for name, (rows, cols) in SHAPES.items():
        parent = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) \
            else layer.mlp
        setattr(parent, name,
                BinaryLinear.from_codes(layout_codes(like, rows, cols, like.shape[1], g)))
    for mod in model.modules():  # the unchanged tensors: small, real
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[pname] = torch.nn.Parameter(
                    torch.randn(p.shape, generator=g) * 0.02, requires_grad=False)
    model.config.quantization_config = {"quant_method": "binllm", "method": method,
                                        "method_args": {}}
    return save_loaded(model, out)


def packed_layer(method: str, work: Path) -> dict:
    """The 7 linears of the saved 7B-shaped layer, loaded by `binllm.load` (the default
    path: kernel form derived at load, packed tensors released)."""
    import binllm
    from binllm.packed.layers import BinaryLinear

    model = binllm.load(layer_dir(method, work))
    mods = {n.rpartition(".")[2]: m for n, m in model.named_modules()
            if isinstance(m, BinaryLinear)}
    for m in mods.values():
        m(torch.zeros(1, m.in_features))
    return {n: mods[n] for n in SHAPES}


def layer_bytes(mods: dict) -> tuple[int, int, int]:
    """(packed buffer bytes resident, kernel form bytes, packed bytes on disk) of one layer."""
    held = sum(m.held_bytes() for m in mods.values())
    form = sum(m.kernel_form().nbytes() for m in mods.values())
    return held - form, form, sum(m.stored_bits() // 8 for m in mods.values())


RSS_PROBE = """
import gc, json, sys, torch
torch.set_num_threads(int(sys.argv[3]))
import binllm
from binllm.packed.layers import BinaryLinear
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
import binllm.kernels.cpu
from binllm.packed.checkpoint import verify_saved
binllm.kernels.cpu.extension()
verify_saved(sys.argv[1])  # imports, and builds (then drops) the skeleton: before the baseline
gc.collect(); before = rss()
model = binllm.load(sys.argv[1], keep_packed=sys.argv[2] == "keep")
gc.collect(); loaded = rss()
with torch.no_grad():
    model(torch.tensor([[1, 2]]))
gc.collect(); after = rss()
held = sum(m.held_bytes() for m in model.modules() if isinstance(m, BinaryLinear))
print(json.dumps({"before": before, "loaded": loaded, "after_forward": after, "held": held}))
"""


def rss_part(methods: list[str], args, work: Path) -> dict:
    """VmRSS of a fresh process loading the saved 7B-shaped layer directory (released, the
    default, and keep_packed=True), against the directory's size."""
    rows = []
    for method in methods:
        d = layer_dir(method, work)
        disk = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        row = {"method": method, "dir_bytes": disk}
        for mode in ("release", "keep"):
            out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(d), mode,
                                  str(args.threads)], capture_output=True, text=True,
                                 check=True, cwd=ROOT)
            row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        mib = 2**20
        print(f"rss {method}: dir {disk / mib:.1f} MiB; " + "; ".join(
            f"{m}: +{(row[m]['loaded'] - row[m]['before']) / mib:.1f} MiB loaded, "
            f"+{(row[m]['after_forward'] - row[m]['before']) / mib:.1f} after a forward, "
            f"held {row[m]['held'] / mib:.1f}" for m in ("release", "keep")), flush=True)
    return {"rows": rows}


def stack_part(methods: list[str], args, work: Path) -> dict:
    torch.manual_seed(0)
    xs = {c: torch.randn(1, c) for c in (4096, 11008)}
    l3 = l3_bytes()
    configs = {}  # label -> (list of layers, each a list of (fn) callables)
    info = {}
    for dtype, label in ((torch.bfloat16, "dense bf16"), (torch.float32, "dense fp32")):
        Ws = {n: torch.randn(r, c).to(dtype) for n, (r, c) in SHAPES.items()}
        xd = {c: x.to(dtype) for c, x in xs.items()}
        configs[label] = [[(lambda W=W, x=xd[W.shape[1]]: F.linear(x, W)) for W in Ws.values()]]
        nbytes = sum(W.numel() * W.element_size() for W in Ws.values())
        info[label] = {"held_bytes": nbytes, "read_bytes": nbytes, "copies": 1}
    for method in methods:
        t = time.perf_counter()
        mods = packed_layer(method, work)
        buffers, form, disk = layer_bytes(mods)
        copies = max(1, -(-3 * l3 // form))
        stack = [mods] + [copy.deepcopy(mods) for _ in range(copies - 1)]
        configs[method] = [[(lambda m=m, x=xs[m.in_features]: m(x)) for m in layer.values()]
                           for layer in stack]
        info[method] = {"held_bytes": buffers + form, "buffer_bytes": buffers,
                        "form_bytes": form, "read_bytes": form, "copies": copies,
                        "disk_bytes": disk,
                        "disk_bits": 8 * disk / sum(r * c for r, c in SHAPES.values()),
                        "build_s": time.perf_counter() - t}
        print(f"{method}: form {form / 2**20:.1f} MiB, buffers {buffers / 2**20:.1f} MiB, "
              f"{copies} copies", flush=True)
    # every call timed on its own: per (config, linear) the best over rounds and copies, so a
    # call that lost its time slice to another job does not count; the layer's time is the sum
    best = {k: [float("inf")] * len(SHAPES) for k in configs}
    samples = {k: [] for k in configs}  # whole passes, for the median
    with torch.no_grad():
        for _ in range(args.repeats):
            for label, layers in configs.items():
                total = 0.0
                for layer in layers:
                    for i, fn in enumerate(layer):
                        t = time.perf_counter()
                        fn()
                        dt = time.perf_counter() - t
                        best[label][i] = min(best[label][i], dt)
                        total += dt
                samples[label].append(total / len(layers))
    bw = bandwidth_gbs()
    rows = []
    for label, s in samples.items():
        r = {"config": label, **info[label], "best_ms": 1e3 * sum(best[label]),
             "best_linear_ms": dict(zip(SHAPES, (1e3 * b for b in best[label]))),
             "median_ms": 1e3 * statistics.median(s),
             "limit_ms": 1e3 * info[label]["read_bytes"] / (bw * 1e9)}
        r["tokens_per_s"] = 1e3 / r["best_ms"]
        rows.append(r)
        print(f"{label}: best {r['best_ms']:.2f} ms, median {r['median_ms']:.2f} ms per layer, "
              f"limit {r['limit_ms']:.2f} ms", flush=True)
    return {"bandwidth_gbs": bw, "rows": rows, "repeats": args.repeats, "l3_bytes": l3}


# -- part 2: stories260K ---------------------------------------------------------------------
def timed_generations(models: dict, tok, rounds: int, new_tokens: int, threads: int) -> dict:
    """tokens/s of `binllm.evaluation.generate` (exactly new_tokens, greedy) per model, the
    models interleaved within each round, at `threads` torch threads: {name: [tok/s, …]}."""
    from binllm.evaluation.generate import generate

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in models.values():  # one untimed run each: first-call costs of the ops
            generate(m, tok, PROMPT, max_new_tokens=4, exact_length=True)
        speeds: dict = {name: [] for name in models}
        for _ in range(rounds):
            for name, m in models.items():
                res = generate(m, tok, PROMPT, max_new_tokens=new_tokens, exact_length=True)
                speeds[name].append(res.tokens_per_s)
        return speeds
    finally:
        torch.set_num_threads(before)


def cli_generations(packed: Path, args) -> list[dict]:
    """`binllm generate` on the packed directory and `binllm generate --original` on the fp32
    stories260K, interleaved, at each of --cli-threads: the same command, the same timing."""
    pattern = r"\[(\d+) new tokens in ([\d.]+) s, ([\d.]+) tokens/s\]"
    rows = []
    for threads in [int(t) for t in args.cli_threads.split(",") if t]:
        runs: dict = {"packed": [], "fp32": []}
        for _ in range(args.cli_repeats):
            for name, target in (("fp32", [str(STORIES), "--original"]),
                                 ("packed", [str(packed)])):
                cmd = [sys.executable, "-m", "binllm", "generate", target[0], PROMPT,
                       *target[1:], "--max-new-tokens", str(args.new_tokens),
                       "--exact-length", "--threads", str(threads)]
                cli = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
                m = re.search(pattern, cli.stdout)
                runs[name].append(float(m.group(3)))
        rows.append({"threads": threads, **{f"{k}_tokens_per_s": v for k, v in runs.items()}})
        print(f"binllm generate, {threads} thread(s): packed {runs['packed']} tok/s, fp32 "
              f"original {runs['fp32']} tok/s", flush=True)
    return rows


def stories_part(methods: list[str], args, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from binllm.engine.binarize import binarize_model
    from binllm.engine.config import QuantizeConfig
    from binllm.evaluation.perplexity import perplexity
    from binllm.packed.checkpoint import load_binarized, save_binarized
    from binllm.packed.layers import set_kernels

    tok, calib, test, _ = stories_inputs(args.nsamples, args.seqlen)
    fp32 = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    rows, cli = [], None
    for method in methods:
        model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
        report = binarize_model(model, QuantizeConfig(method=method), calib)
        out = save_binarized(model, report, tok, work / f"stories-{method}")
        loaded = load_binarized(out)  # the default: kernels
        ppl_k = perplexity(loaded, test, args.seqlen, max_windows=args.windows).ppl
        speeds = timed_generations({"fp32": fp32, "packed": loaded}, tok, args.gen_repeats,
                                   args.new_tokens, args.gen_threads)
        set_kernels(loaded, False)
        ppl_d = perplexity(loaded, test, args.seqlen, max_windows=args.windows).ppl
        med = {k: statistics.median(v) for k, v in speeds.items()}
        rows.append({"method": method, "ppl_kernels": ppl_k, "ppl_dequantize": ppl_d,
                     "same_4_digits": f"{ppl_k:.4g}" == f"{ppl_d:.4g}",
                     "tokens_per_s_kernels": med["packed"], "tokens_per_s_fp32": med["fp32"],
                     "best_tokens_per_s_kernels": max(speeds["packed"]),
                     "best_tokens_per_s_fp32": max(speeds["fp32"]), "speeds": speeds})
        print(f"stories260K {method}: ppl kernels {ppl_k:.6f} / dequantize {ppl_d:.6f}, "
              f"median {med['packed']:.1f} tok/s vs fp32 {med['fp32']:.1f} in the same rounds",
              flush=True)
        if method == args.cli_method:
            cli = cli_generations(out, args)
        shutil.rmtree(out)
    return {"rows": rows, "cli": cli, "cli_method": args.cli_method,
            "gen_threads": args.gen_threads,
            "calibration": f"tinystories train, {args.nsamples} × {args.seqlen} tokens",
            "windows": args.windows, "seqlen": args.seqlen, "new_tokens": args.new_tokens,
            "gen_repeats": args.gen_repeats}


def step_part(methods: list[str], args, work: Path) -> dict:
    """stories260K: best ms of one greedy decode step (1 token, KV cache of the prompt) over
    `--step-repeats` steps, fp32 original against the packed model (kernels), interleaved;
    robust to a shared CPU where whole generations are not."""
    from transformers import AutoModelForCausalLM

    from binllm.engine.binarize import binarize_model
    from binllm.engine.config import QuantizeConfig
    from binllm.packed.checkpoint import load_binarized, save_binarized

    tok, calib, _, ids = stories_inputs(args.nsamples, args.seqlen)
    models = {"fp32": AutoModelForCausalLM.from_pretrained(STORIES).eval()}
    for method in methods:
        model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
        report = binarize_model(model, QuantizeConfig(method=method), calib)
        models[method] = load_binarized(save_binarized(model, report, tok, work / method))
    state = {}
    with torch.no_grad():
        for name, m in models.items():
            out = m(ids, use_cache=True)
            state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
        best = {name: float("inf") for name in models}
        for _ in range(args.step_repeats):
            for name, m in models.items():
                past, nxt = state[name]
                t = time.perf_counter()
                m(nxt, past_key_values=copy.deepcopy(past), use_cache=True)
                best[name] = min(best[name], time.perf_counter() - t)
    print("decode step ms:", {k: round(1e3 * v, 3) for k, v in best.items()}, flush=True)
    return {"best_step_ms": {k: 1e3 * v for k, v in best.items()},
            "repeats": args.step_repeats}


# -- report ----------------------------------------------------------------------------------
def write_markdown(res: dict, path: Path) -> None:
    mib = 2**20
    lines = ["# CPU kernels on the packed bits (issue 10)", "",
             (f"`python benchmarks/bench_kernels.py` on {res['machine']}, torch {res['torch']}, "
              f"{res['threads']} threads, extension: {res['extension']}. The CPU is shared with "
              "other jobs: every number is the best (and median) of interleaved rounds.")]
    st = res.get("stack")
    if st:
        dense = {r["config"]: r for r in st["rows"] if r["config"].startswith("dense")}
        fastest = min(dense.values(), key=lambda r: r["best_ms"])
        lines += [
            "", "## One LLaMA-7B-shaped decoder layer, batch 1 (7 linears, 202.4 M weights)", "",
            (f"Memory bandwidth (512 MiB copy, read + write): {st['bandwidth_gbs']:.1f} GB/s. "
             f"{st['repeats']} interleaved rounds; 'best' sums each linear's best call, "
             "'median' is the median whole pass. 'limit' = bytes read per token / bandwidth. "
             f"Speed-up against the faster dense path ({fastest['config']})."), "",
            md_row("config", "disk bits/w", "held MiB (buffers + form)", "read MiB/token",
                   "copies", "best ms/layer", "median ms", "tokens/s (1 layer)", "limit ms",
                   "× faster dense"),
            md_row(*["---"] * 10)]
        for r in st["rows"]:
            held = (f"{r['held_bytes'] / mib:.1f}" if "form_bytes" not in r else
                    f"{r['held_bytes'] / mib:.1f} ({r['buffer_bytes'] / mib:.1f} + "
                    f"{r['form_bytes'] / mib:.1f})")
            lines.append(md_row(
                r["config"], f"{r['disk_bits']:.3f}" if "disk_bits" in r else "—", held,
                f"{r['read_bytes'] / mib:.1f}", r["copies"], f"{r['best_ms']:.2f}",
                f"{r['median_ms']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['limit_ms']:.2f}",
                f"{fastest['best_ms'] / r['best_ms']:.2f}"))
        lines += ["", ("Packed rows: the layer saved as a binllm directory (a one-layer "
                       "7B-shaped LLaMA) and loaded by `binllm.load`, running "
                       "`BinaryLinear.forward` on its default path (the kernel form and the "
                       "AVX-512 lookup-table GEMV). 'held': bytes the loaded layers hold "
                       "(`BinaryLinear.held_bytes`: resident packed buffers + kernel form); "
                       "the loader releases the packed buffers once the form is derived "
                       "(read back from the shard on demand, `binllm.packed.source`), so "
                       "the buffers part is 0 unless a layer still needs them. 'copies': "
                       "packed layers cycled so that a pass reads more than 3× the "
                       f"{st.get('l3_bytes', 32 * 2**20) / 2**20:.0f} MiB L3 cache.")]
    rs = res.get("rss")
    if rs:
        lines += ["", "## Resident memory of a process loading the 7B-shaped layer", "",
                  ("VmRSS of a fresh process before `binllm.load(DIR)` (imports, the CPU "
                   "extension and one skeleton of the architecture built and dropped first: "
                   "one-time costs of ~230 MiB), after it and after one forward; 'release' is "
                   "the default, 'keep' is `keep_packed=True` (buffers kept beside the form)."),
                  "", md_row("method", "dir MiB (safetensors)", "mode", "RSS +MiB loaded",
                             "RSS +MiB after forward", "held MiB (held_bytes)"),
                  md_row(*["---"] * 6)]
        for r in rs["rows"]:
            for mode in ("release", "keep"):
                m = r[mode]
                lines.append(md_row(r["method"], f"{r['dir_bytes'] / mib:.1f}", mode,
                                    f"{(m['loaded'] - m['before']) / mib:.1f}",
                                    f"{(m['after_forward'] - m['before']) / mib:.1f}",
                                    f"{m['held'] / mib:.1f}"))
    sp = res.get("stories")
    if sp and "fp32_tokens_per_s" in sp:  # a results file of the older layout
        lines += ["", "## stories260K end to end", "", "(older results layout; rerun)"]
    elif sp:
        lines += ["", f"## stories260K end to end (calibration: {sp['calibration']})", "",
                  (f"Greedy generation of exactly {sp['new_tokens']} new tokens "
                   "(`binllm.evaluation.generate`, the function `binllm generate` times: "
                   "model.generate with its KV cache; kernel forms and the CPU kernels are "
                   "loaded by `binllm.load`, outside the timed call), the fp32 original and "
                   f"the packed model interleaved in {sp['gen_repeats']} rounds after one "
                   f"untimed run each, at {sp['gen_threads']} torch thread(s): on this shared "
                   "2-core machine, 2 threads make every attention call of a model this small "
                   "wait for a descheduled OpenMP worker, which swamps both models alike "
                   "(see the `binllm generate` rows). 'vs fp32' = median packed / median fp32 "
                   "of the same rounds. Perplexity: tinystories test, "
                   f"{sp['windows']} windows of {sp['seqlen']}."),
                  "", md_row("method", "tok/s packed median (best)", "tok/s fp32 median (best)",
                           "vs fp32", "ppl kernels", "ppl dequantize", "equal to 4 digits"),
                  md_row(*["---"] * 7)]
        for r in sp["rows"]:
            lines.append(md_row(
                r["method"],
                f"{r['tokens_per_s_kernels']:.1f} ({r['best_tokens_per_s_kernels']:.1f})",
                f"{r['tokens_per_s_fp32']:.1f} ({r['best_tokens_per_s_fp32']:.1f})",
                f"{r['tokens_per_s_kernels'] / r['tokens_per_s_fp32']:.2f}",
                f"{r['ppl_kernels']:.4f}", f"{r['ppl_dequantize']:.4f}",
                "yes" if r["same_4_digits"] else "NO"))
        if sp.get("cli"):
            lines += ["", (f"`binllm generate DIR \"{PROMPT}\" --max-new-tokens "
                           f"{sp['new_tokens']} --exact-length --threads T` on the "
                           f"{sp['cli_method']} directory against `binllm generate "
                           "stories260K … --original` (the same command on the fp32 original), "
                           "interleaved, each run a fresh process; tokens/s as printed:"), "",
                      md_row("threads", "packed tok/s: median (runs)", "fp32 tok/s: median (runs)",
                           "packed / fp32"), md_row(*["---"] * 4)]
            for c in sp["cli"]:
                pk, fp = c["packed_tokens_per_s"], c["fp32_tokens_per_s"]

                def runs(v):
                    return f"{statistics.median(v):.1f} ({', '.join(f'{x:.1f}' for x in v)})"

                lines.append(md_row(c["threads"], runs(pk), runs(fp),
                                  f"{statistics.median(pk) / statistics.median(fp):.2f}"))
    ss = res.get("stories_step")
    if ss:
        b = ss["best_step_ms"]
        lines += ["", (f"One greedy decode step of stories260K (1 token after the prompt, KV "
                       f"cache), best of {ss['repeats']} interleaved steps: "
                       + ", ".join(f"{k} {v:.3f} ms ({1e3 / v:.0f} tokens/s)"
                                   for k, v in b.items()) + ".")]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from binllm.kernels import cpu
    from binllm.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(m for m in STACK_METHODS if m in METHODS))
    p.add_argument("--stories-methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--cli-method", default="billm")
    p.add_argument("--cli-threads", default="1,2",
                   help="thread counts of the `binllm generate` runs (packed vs --original)")
    p.add_argument("--cli-repeats", type=int, default=3)
    p.add_argument("--gen-threads", type=int, default=1,
                   help="torch threads of the in-process stories260K generations")
    p.add_argument("--skip-stack", action="store_true")
    p.add_argument("--skip-stories", action="store_true")
    p.add_argument("--step-methods", default="", help="run the decode-step part for these")
    p.add_argument("--rss-methods", default="rtn-sign,billm,arb-llm-rc",
                   help="VmRSS of a process loading the saved 7B-shaped layer ('' = skip)")
    p.add_argument("--step-repeats", type=int, default=200)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    if args.render_only:
        write_markdown(json.loads((args.out / "kernels.json").read_text()),
                       args.out / "kernels.md")
        return 0
    torch.set_num_threads(args.threads)
    status = cpu.extension()
    res = {"machine": f"{platform.machine()} CPU", "torch": torch.__version__,
           "threads": args.threads,
           "extension": ("AVX-512" if status.avx512 else "portable C++") if status.ok
           else f"none ({status.reason})"}
    old = args.out / "kernels.json"
    if (args.skip_stack or args.skip_stories) and old.is_file():  # keep the part not rerun
        kept = json.loads(old.read_text())
        res.update({k: kept[k] for k in ("stack", "stories", "stories_step", "rss")
                    if k in kept})
    with tempfile.TemporaryDirectory(prefix="bench_kernels-") as tmp:  # saved layer dirs
        if not args.skip_stack:
            res["stack"] = stack_part([m for m in args.methods.split(",") if m], args,
                                      Path(tmp))
        if args.rss_methods:
            res["rss"] = rss_part([m for m in args.rss_methods.split(",") if m], args,
                                  Path(tmp))
    if not args.skip_stories:
        with tempfile.TemporaryDirectory(prefix="bench_kernels-") as tmp:
            res["stories"] = stories_part([m for m in args.stories_methods.split(",") if m],
                                          args, Path(tmp))
    if args.step_methods:
        with tempfile.TemporaryDirectory(prefix="bench_kernels-") as tmp:
            res["stories_step"] = step_part([m for m in args.step_methods.split(",") if m],
                                            args, Path(tmp))
    res["load_average_at_end"] = list(os.getloadavg())  # other jobs on the shared CPU
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(res, indent=2))
    write_markdown(res, args.out / "kernels.md")
    print(f"wrote {args.out / 'kernels.json'} and kernels.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
