"""Issue 4 benchmark: packed binarized models on disk, in memory and generating, on CPU.

Part 1, stories260K, every registered method (real calibration on tinystories): on-disk
bits/weight of the binarized linears (measured from the files), file size against the same
model in fp16, peak RSS while `binllm.load` runs (in a fresh subprocess after the imports:
the kernel's high-water mark is reset through /proc/self/clear_refs, and VmHWM after loading
minus VmRSS before is reported, after touching every loaded tensor since safetensors maps
the files lazily; ru_maxrss is recorded too but is unusable here: a child forked from this
large process inherits the parent's high-water mark), and greedy generation speed of the packed
model (dequantizing at every forward, and with cache_dequantized) against the fp32 original.

Part 2, one LLaMA-7B-shaped decoder layer (q/k/v/o 4096×4096, gate/up 11008×4096, down
4096×11008; vocab 256 so embeddings are negligible). Running BiLLM/ARB on these shapes takes
tens of minutes per matrix on a 2-core CPU, so each method's codes are synthesised with the
layout its stories260K codes have (format, orders, groups, mean/column scales, bits,
group size, PB-LLM's salient fraction) and random values; BiLLM-family layers get 3 salient
columns per 128-column block (≈2.3 %, what BiLLM picks on LLaMA-2-7B, BiLLM issue #24).
Size and speed depend on that layout only. Measured: file size vs fp16, load peak RSS vs
loading the fp16 checkpoint, decode speed (tokens/s) packed / cached / fp32, and the time to
unpack and dequantize one 11008×4096 weight.

    python benchmarks/bench_packed.py [--methods billm,gptq] [--skip-stack] [--threads 2]
Writes benchmarks/results/packed.json and packed.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (benchmarks/ is not a package)
    OUT,
    ROOT,
    STORIES,
    generation_speed,
    md_row,
    stories_inputs,
    write_results,
)

LOAD_SNIPPET = r"""
import json, resource, sys, time
import torch, safetensors.torch, transformers, binllm, binllm.packed.checkpoint
import transformers.models.llama.modeling_llama
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
def status(key):  # kB values of /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
how, path = sys.argv[1], sys.argv[2]
before = status("VmRSS")
try:  # reset the high-water mark so that VmHWM is the peak of the load alone
    open("/proc/self/clear_refs", "w").write("5")
    reset = True
except OSError:
    reset = False
t = time.perf_counter()
if how == "binllm":
    m = binllm.load(path)
else:
    m = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, how))
seconds = time.perf_counter() - t
tensors = [*m.parameters(), *m.buffers()]
for x in tensors:  # safetensors maps files lazily: touch every page (no temporary copies)
    x.any() if x.dtype == torch.bool else x.amax()
held = sum(x.numel() * x.element_size() for x in tensors) / 2**20
print(json.dumps({"rss_before_mib": before, "peak_mib": status("VmHWM"), "hwm_reset": reset,
                  "delta_mib": status("VmHWM") - before, "rss_after_mib": status("VmRSS"),
                  "seconds": seconds, "tensors_mib": held,
                  "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure_load(how: str, path: Path) -> dict:
    """Peak RSS of loading `path` in a fresh process ('binllm', or an HF dtype name)."""
    res = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, how, str(path)], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


# -- part 1: stories260K -------------------------------------------------------------------
def stories_part(methods: list[str], args, work: Path) -> tuple[list[dict], dict, dict]:
    from transformers import AutoModelForCausalLM

    from binllm.engine.binarize import binarize_model
    from binllm.packed.checkpoint import load_binarized, save_binarized
    from binllm.engine.config import QuantizeConfig
    from binllm.evaluation.perplexity import perplexity
    from binllm.packed.layers import set_cache_dequantized
    from binllm.packed.saved_dir import inspect_saved

    tok, calib, test, ids = stories_inputs(args.nsamples, args.seqlen)
    fp32 = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    base = {"fp32_tokens_per_s": generation_speed(fp32, ids, args.new_tokens),
            "fp32_load": measure_load("float32", STORIES),
            "ppl_fp32": perplexity(fp32, test, args.seqlen, max_windows=args.windows).ppl}
    rows, codes_of = [], {}
    for method in methods:
        model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
        report = binarize_model(model, QuantizeConfig(method=method), calib)
        codes_of[method] = report
        out = save_binarized(model, report, tok, work / f"stories-{method}")
        info = inspect_saved(out)
        loaded = load_binarized(out)
        ppl_mem = perplexity(model, test, args.seqlen, max_windows=args.windows).ppl
        ppl_disk = perplexity(loaded, test, args.seqlen, max_windows=args.windows).ppl
        packed_speed = generation_speed(loaded, ids, args.new_tokens)
        set_cache_dequantized(loaded, True)
        cached_speed = generation_speed(loaded, ids, args.new_tokens)
        rows.append({
            "method": method, "paper_bits": info.paper_bits, "disk_bits": info.stored_bits,
            "codes_bits": info.codes_bits, "file_bytes": info.file_bytes,
            "fp16_bytes": info.fp16_bytes, "linear_bytes": sum(x.stored_bytes for x in info.layers),
            "linear_fp16_bytes": sum(2 * x.shape[0] * x.shape[1] for x in info.layers),
            "load": measure_load("binllm", out), "ppl_in_memory": ppl_mem, "ppl_loaded": ppl_disk,
            "tokens_per_s_packed": packed_speed, "tokens_per_s_cached": cached_speed})
        print(f"stories260K {method}: {info.stored_bits:.3f} disk bits/w, "
              f"{info.file_bytes / info.fp16_bytes:.3f}× fp16, {packed_speed:.1f}/"
              f"{cached_speed:.1f} tok/s, ppl {ppl_disk:.3f}", flush=True)
        shutil.rmtree(out)
    return rows, base, codes_of


# -- part 2: a LLaMA-7B-shaped decoder layer -----------------------------------------------
def layout_codes(like, rows: int, cols: int, small_cols: int, g: torch.Generator):
    """Codes of shape (rows, cols) with the layout of `like` (codes of a small layer)."""
    from binllm.methods.codes import BinaryCodes, PartialBinaryCodes, UniformCodes, to_storage

    def scaled(size: int) -> int:  # "whole row" group sizes follow the row length
        return cols if size >= small_cols else size

    from binllm.methods.factor_codes import FactorCodes

    if isinstance(like, FactorCodes):  # binary-factor at its default bits=1.0
        from binllm.methods.binary_factor import rank_for_bits

        r = rank_for_bits(rows, cols, 1.0)
        return FactorCodes(torch.rand(rows, r, generator=g) > 0.5,
                           torch.rand(cols, r, generator=g) > 0.5,
                           to_storage(torch.rand(rows, generator=g) * 0.01),
                           to_storage(torch.rand(cols, generator=g) + 0.5))
    if isinstance(like, UniformCodes):
        gs = scaled(like.groupsize)
        ng = -(-cols // gs)
        return UniformCodes(torch.randint(0, 2 ** like.bits, (rows, cols),
                                          generator=g).to(torch.uint8),
                            to_storage(torch.rand(rows, ng, generator=g) * 0.01),
                            torch.randint(0, 2 ** like.bits, (rows, ng), generator=g).float(),
                            like.bits, gs)
    if isinstance(like, PartialBinaryCodes):
        gs = scaled(like.groupsize)
        ng = -(-cols // gs)
        sal = torch.rand(rows, cols, generator=g) < like.salient.float().mean().item()
        q = torch.randint(0, 2 ** like.high_bit, (rows, cols), generator=g).to(torch.uint8)
        return PartialBinaryCodes(sal, torch.where(sal, q, 0),
                                  to_storage(torch.rand(rows, generator=g) * 1e-3),
                                  torch.randint(0, 2 ** like.high_bit, (rows,),
                                                generator=g).float(),
                                  torch.rand(rows, cols, generator=g) > 0.5,
                                  to_storage(torch.rand(rows, ng, generator=g) * 0.02),
                                  to_storage(torch.randn(rows, ng, generator=g) * 1e-3),
                                  like.high_bit, gs)
    assert isinstance(like, BinaryCodes)
    bs = scaled(like.block_size)
    nblk, G, K = -(-cols // bs), len(like.orders), like.signs.shape[0]
    if 0 < like.n_salient < G:
        sal = torch.zeros(cols, dtype=torch.bool)
        for b in range(0, cols, 128):  # 3 salient columns per 128 (BiLLM issue #24)
            sal[b + torch.randperm(min(128, cols - b), generator=g)[:3]] = True
    else:
        sal = torch.full((cols,), like.n_salient == G)
    u = torch.rand(rows, cols, generator=g)
    n_s, n_r = max(like.n_salient, 1), max(G - like.n_salient, 1)
    group = torch.where(sal[None], (u * n_s).long().clamp(max=n_s - 1),
                        like.n_salient + (u * n_r).long().clamp(max=n_r - 1)).to(torch.uint8)
    alpha = to_storage(torch.rand(G, K, rows, nblk, generator=g) * 0.02)
    for gi, order in enumerate(like.orders):
        alpha[gi, order:] = 0
    mu = to_storage(torch.randn(G, rows, nblk, generator=g) * 1e-3) if like.mu is not None else None
    beta = to_storage(torch.rand(G, K, cols, generator=g) + 0.5) if like.beta is not None else None
    return BinaryCodes(group, torch.rand(K, rows, cols, generator=g) > 0.5, alpha, mu, beta, sal,
                       like.orders, like.n_salient, bs)


def stack_part(methods: list[str], reports: dict, args, work: Path) -> tuple[list[dict], dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from binllm.engine.binarize import QuantizeReport
    from binllm.packed.checkpoint import load_binarized, save_binarized
    from binllm.packed.layers import set_cache_dequantized
    from binllm.packed.saved_dir import inspect_saved

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=256,
                      max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 8))
    fp16_dir = work / "stack-fp16"
    model.to(torch.float16).save_pretrained(fp16_dir)
    model.to(torch.float32)
    base = {"fp32_tokens_per_s": generation_speed(model, ids, args.stack_tokens, repeats=2),
            "fp16_load": measure_load("float16", fp16_dir), "fp16_file_bytes": dir_bytes(fp16_dir),
            "linear_numel": sum(m.weight.numel() for m in model.model.layers[0].modules()
                                if isinstance(m, torch.nn.Linear))}
    shutil.rmtree(fp16_dir)
    rows = []
    for method in methods:
        small = reports[method]
        g = torch.Generator().manual_seed(1)
        # the widest stories260K layer (down_proj, 172 columns) shows the block/group layout
        like = max(small.codes.values(), key=lambda c: c.shape[1])
        codes = {f"model.layers.0.{name}": layout_codes(like, *mod.weight.shape, like.shape[1], g)
                 for name, mod in model.model.layers[0].named_modules()
                 if isinstance(mod, torch.nn.Linear)}
        report = QuantizeReport(method=method, method_args=small.method_args, config=small.config,
                                codes=codes)
        out = save_binarized(model, report, None, work / f"stack-{method}")
        info = inspect_saved(out)
        load = measure_load("binllm", out)
        packed = load_binarized(out)
        gate = packed.model.layers[0].mlp.gate_proj
        t = time.perf_counter()
        c = gate.codes()
        unpack_s = time.perf_counter() - t
        t = time.perf_counter()
        c.dequantize()
        dequant_s = time.perf_counter() - t
        packed_speed = generation_speed(packed, ids, 2, repeats=1)
        set_cache_dequantized(packed, True)
        cached_speed = generation_speed(packed, ids, args.stack_tokens, repeats=2)
        rows.append({"method": method, "disk_bits": info.stored_bits, "paper_bits": info.paper_bits,
                     "linear_bytes": sum(x.stored_bytes for x in info.layers),
                     "file_bytes": info.file_bytes, "load": load, "gate_unpack_s": unpack_s,
                     "gate_dequantize_s": dequant_s, "tokens_per_s_packed": packed_speed,
                     "tokens_per_s_cached": cached_speed})
        print(f"7B layer {method}: {info.stored_bits:.3f} bits/w, "
              f"{rows[-1]['linear_bytes'] / 2**20:.1f} MiB linears, "
              f"load +{load['delta_mib']:.0f} MiB, "
              f"{packed_speed:.2f}/{cached_speed:.2f} tok/s", flush=True)
        del packed
        shutil.rmtree(out)
    return rows, base


# -- report ----------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    mib = 2**20
    sb = res["stories_base"]
    lines = [
        "# Packed binarized models (issue 4)", "",
        (f"`python benchmarks/bench_packed.py` on {res['machine']}, torch {res['torch']}, "
         f"{res['threads']} threads, a CPU shared with other jobs (speeds are indicative). "
         "Bits/weight are those of the binarized linears, measured from the safetensors headers; "
         "in every row they equal the codes' own `stored_bits()` accounting, which is what "
         "`binllm inspect` prints. Paper bits count sign/level bits only, as the papers do. "
         "'load +MiB' is the peak RSS of `binllm.load` in a fresh process above the RSS before "
         "it, every loaded tensor touched."),
        "", f"## stories260K, every registered method (calibration: {res['calibration']})", "",
        (f"fp32 original: load +{sb['fp32_load']['delta_mib']:.1f} MiB, "
         f"{sb['fp32_tokens_per_s']:.1f} tokens/s greedy ({res['new_tokens']} new tokens), "
         f"perplexity {sb['ppl_fp32']:.3f} (tinystories test, {res['windows']} windows of "
         f"{res['seqlen']})."), "",
        md_row("method", "paper bits", "disk bits/w", "linears KiB (fp16)", "files KiB (fp16)",
             "size vs fp16", "load +MiB", "tok/s packed", "tok/s cached",
             "ppl loaded = in memory"),
        md_row(*["---"] * 10)]
    for r in res["stories"]:
        same = "yes" if r["ppl_loaded"] == r["ppl_in_memory"] else "NO"
        lines.append(md_row(
            r["method"], f"{r['paper_bits']:.3f}", f"{r['disk_bits']:.3f}",
            f"{r['linear_bytes'] / 1024:.1f} ({r['linear_fp16_bytes'] / 1024:.1f})",
            f"{r['file_bytes'] / 1024:.1f} ({r['fp16_bytes'] / 1024:.1f})",
            f"{r['file_bytes'] / r['fp16_bytes']:.3f}", f"{r['load']['delta_mib']:.1f}",
            f"{r['tokens_per_s_packed']:.1f}", f"{r['tokens_per_s_cached']:.1f}",
            f"{r['ppl_loaded']:.3f} ({same})"))
    lines += ["", ("stories260K's linears are 64 or 172 columns wide, so per-row scales and means "
                   "(fp16, per 128-column block) weigh far more per weight than on 4096-wide "
                   "layers, and the unchanged fp32 embedding is a third of the files.")]
    if res.get("stack"):
        b = res["stack_base"]
        lines += [
            "",
            "## One LLaMA-7B-shaped decoder layer (codes synthesised with each method's layout)",
            "",
            (f"{b['linear_numel'] / 1e6:.1f} M linear weights (q/k/v/o 4096×4096, gate/up "
             f"11008×4096, down 4096×11008): fp16 checkpoint {b['fp16_file_bytes'] / mib:.1f} MiB, "
             f"load +{b['fp16_load']['delta_mib']:.0f} MiB (from_pretrained, float16); fp32 "
             f"decode {b['fp32_tokens_per_s']:.2f} tokens/s."), "",
            md_row("method", "paper bits", "disk bits/w", "linears MiB", "vs fp16 linears",
                 "files MiB", "load +MiB", "unpack 11008×4096 s", "dequantize s",
                 "tok/s packed", "tok/s cached"),
            md_row(*["---"] * 11)]
        for r in res["stack"]:
            lines.append(md_row(
                r["method"], f"{r['paper_bits']:.3f}", f"{r['disk_bits']:.3f}",
                f"{r['linear_bytes'] / mib:.1f}",
                f"{r['linear_bytes'] / (2 * b['linear_numel']):.3f}",
                f"{r['file_bytes'] / mib:.1f}", f"{r['load']['delta_mib']:.0f}",
                f"{r['gate_unpack_s']:.2f}", f"{r['gate_dequantize_s']:.2f}",
                f"{r['tokens_per_s_packed']:.3f}", f"{r['tokens_per_s_cached']:.2f}"))
        lines += ["", ("'packed' dequantizes every weight at every forward (the reference path: "
                       "unpack, then the codes' own `dequantize()`); 'cached' keeps each layer's "
                       "dequantized fp32 weight after the first forward (`cache_dequantized`: "
                       "memory of fp32 weights, speed of nn.Linear). Paper bits of BiLLM-family "
                       "rows follow from the assumed 3 salient columns per 128.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from binllm.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--stack-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-stack", action="store_true")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--render-only", action="store_true", help="rewrite packed.md from packed.json")
    args = p.parse_args(argv)
    if args.render_only:
        res = json.loads((args.out / "packed.json").read_text())
        (args.out / "packed.md").write_text(markdown(res))
        return 0
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    res = {"machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'})",
           "torch": torch.__version__, "threads": args.threads, "seqlen": args.seqlen,
           "windows": args.windows, "new_tokens": args.new_tokens,
           "calibration": f"tinystories train, {args.nsamples} × {args.seqlen} tokens"}
    with tempfile.TemporaryDirectory(prefix="bench_packed-") as tmp:
        work = Path(tmp)
        res["stories"], res["stories_base"], reports = stories_part(methods, args, work)
        if not args.skip_stack:
            res["stack"], res["stack_base"] = stack_part(methods, reports, args, work)
    write_results("packed", res, markdown(res), args.out)
    print(f"wrote {args.out / 'packed.json'} and packed.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
