"""A real model, whole: evaluation time, decode and prompt speed, file size (SmolLM2-135M).

One run, one machine, one prompt, for each model:

- **evaluation**: seconds of wikitext2 perplexity (first `--windows` windows of 2048 tokens)
  as `binllm eval` computes it: the dense model whole, a packed model layer by layer with each
  linear dequantized once per pass (`binllm.engine.stream_eval.packed_perplexity`); and, for
  the first packed model, the whole-model forward with the kernels, window by window (the
  path a plain `model(ids)` takes), on `--kernel-windows` windows.
- **decode**: tokens/s of greedy decode, 128 single-token steps after a 32-token prompt's
  forward (KV cache; the prompt untimed, as llama.cpp's `tg` figures and its rows here), at 1
  and 2 threads, by binllm's lean decode loop (`binllm.runtime`, what `binllm generate` runs
  for the LLaMA family) and by transformers' `generate`, for every torch model (dense or
  packed), so each is compared with the best dense path;
- **prompt**: tokens/s of one forward over a 512-token prompt, at 1 and 2 threads;
- **size**: bytes of the model's files.

With `--int8-prefill` each packed model gets a second row with its prompts and evaluation
windows computed by the int8 prefill (`binllm eval|generate --prefill int8`: x and the
rebuilt weight rows rounded to int8, one int8 GEMM; decode is the exact path and is not
repeated): its perplexity shows what the approximation costs.

Packed models are saved once into --work (`binllm quantize … --no-eval --out`, the
benchmark protocol's calibration: 32 × 2048 tokens of wikitext2 validation) and reused.
llama.cpp rows are added where `llama-cpp-python` is installed and a GGUF is given; build it
for the CPU (`CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python`: without it ggml
decodes 2-3x slower on an AVX-512 CPU), and the results record the features it was built for.
OpenMP's wait policy is left as the environment has it (unset: the default, as `binllm
generate` runs): with OMP_WAIT_POLICY=PASSIVE every one of a token's ~200 parallel regions
wakes sleeping threads, and 2-thread decode of a packed q1_0 SmolLM2 drops from ~73 to ~39
tokens/s (measured with `binllm generate`); the policy is recorded with the results.

    python benchmarks/bench_real_runtime.py [--methods q1_0,rtn-sign] [--windows 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP's default)")  # as torch loads
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, generation_speed, md_row, write_results  # noqa: E402
from bench_real import MODEL, model_dir  # noqa: E402

import torch  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS, PREFILL_TOKENS = 32, 128, 512


def saved_model(model: Path, method: str, work: Path, extra: list[str]) -> Path:
    """The packed directory of `method` (quantized once with the benchmark protocol)."""
    tag = method + "".join(f"_{a.strip('-').replace('=', '-')}" for a in extra)
    out = work / tag
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "binllm", "quantize", str(model), "--method", method,
               "--calib", "wikitext2", "--calib-split", "validation", "--nsamples", "32",
               "--seqlen", "2048", "--eval", "", "--out", str(out), "--data-dir", str(DATA),
               *extra]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return out


def files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()
               if p.suffix in (".safetensors", ".gguf", ".bin"))


def eval_seconds(model, tokens, windows: int, layerwise: bool) -> tuple[float, float]:
    """(seconds, perplexity) of the first `windows` windows of 2048 tokens."""
    from binllm.engine.stream_eval import packed_perplexity
    from binllm.evaluation.perplexity import perplexity

    fn = packed_perplexity if layerwise else perplexity
    t = time.perf_counter()
    res = fn(model, tokens, 2048, max_windows=windows)
    return time.perf_counter() - t, res.ppl


def prompt_tps(model, ids: torch.Tensor) -> float:
    """Best of two: tokens/s of one forward over `ids` (1, 512)."""
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        with torch.no_grad():
            model(ids, use_cache=False)
        best = min(best, time.perf_counter() - t)
    return ids.shape[1] / best


def speeds(model, tokens) -> dict:
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for loop, key in (("lean", "decode_tps"), ("transformers", "decode_tps_hf")):
            out[f"{key}_{threads}t"] = generation_speed(model, tokens[:, :PROMPT_TOKENS],
                                                        NEW_TOKENS, repeats=2, loop=loop)
        out[f"prompt_tps_{threads}t"] = prompt_tps(model, tokens[:, :PREFILL_TOKENS])
    torch.set_num_threads(2)
    return out


def int8_row(model, name: str, file_bytes: int, tokens, windows: int) -> dict:
    """Evaluation and prompt speed of a packed model with the int8 prefill turned on."""
    from binllm.packed.layers import set_int8_prefill

    set_int8_prefill(model, True)
    row = {"model": name, "file_bytes": file_bytes}
    row["eval_s"], row["ppl"] = eval_seconds(model, tokens, windows, True)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        row[f"prompt_tps_{threads}t"] = prompt_tps(model, tokens[:, :PREFILL_TOKENS])
    torch.set_num_threads(2)
    set_int8_prefill(model, False)
    return row


def decode_cell(row: dict, threads: int) -> str:
    """Decode tokens/s of the lean loop, transformers' in brackets where measured."""
    if f"decode_tps_{threads}t" not in row:
        return ""
    cell = f"{row[f'decode_tps_{threads}t']:.1f}"
    hf = row.get(f"decode_tps_hf_{threads}t")
    return cell if hf is None else f"{cell} ({hf:.1f})"


def llama_cpp_build() -> str | None:
    """llama-cpp-python's version and the CPU features its ggml was compiled for (a build
    without GGML_NATIVE runs 2-3x slower on an AVX-512 CPU); None where it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return f"llama-cpp-python {llama_cpp.__version__}; {info}"


def llama_cpp_decode_seconds(llm, ids: list[int]) -> float:
    """Seconds of llama.cpp's greedy decode of NEW_TOKENS tokens after the first PROMPT_TOKENS
    of ids (the prompt's own evaluation not timed), from a reset context."""
    llm.reset()
    llm.eval(ids[:PROMPT_TOKENS])
    t = time.perf_counter()
    for _ in range(NEW_TOKENS):
        llm.eval([int(llm.sample(temp=0.0))])  # greedy
    return time.perf_counter() - t


def llama_cpp_rows(ggufs: list[Path], tokens) -> list[dict]:
    """Decode and prompt tokens/s of each GGUF in llama.cpp, greedy, same token ids."""
    try:
        import llama_cpp  # noqa: F401
        from binllm.export.llama_runtime import llama_cpp_model
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows")
        return []
    rows = []
    ids = tokens[0].tolist()
    for g in ggufs:
        row = {"model": f"llama.cpp {g.name}", "file_bytes": g.stat().st_size}
        for threads in (1, 2):
            llm = llama_cpp_model(g, n_ctx=2048, n_threads=threads, n_batch=512)
            best_prompt = best_decode = float("inf")
            for _ in range(2):
                llm.reset()
                t = time.perf_counter()
                llm.eval(ids[:PREFILL_TOKENS])
                best_prompt = min(best_prompt, time.perf_counter() - t)
                best_decode = min(best_decode, llama_cpp_decode_seconds(llm, ids))
            row[f"prompt_tps_{threads}t"] = PREFILL_TOKENS / best_prompt
            row[f"decode_tps_{threads}t"] = NEW_TOKENS / best_decode
            del llm
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--methods", default="q1_0,rtn-sign",
                    help="packed models, comma-separated; METHOD+--flag=value adds CLI flags")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/binllm/runtime")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--kernel-windows", type=int, default=4)
    ap.add_argument("--gguf", type=Path, action="append", default=[],
                    help="GGUF files for llama.cpp rows (repeatable)")
    ap.add_argument("--packed-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="dtype packed models load in (their unchanged tensors: embeddings, "
                         "norms, lm_head; float32 on a CPU without bf16 instructions)")
    ap.add_argument("--int8-prefill", action="store_true",
                    help="also time each packed model's prompt and evaluation in int8")
    ap.add_argument("--stem", default="real_runtime",
                    help="results file name in benchmarks/results/ (STEM.json, STEM.md)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import binllm
    from binllm.evaluation.data import eval_tokens, load_text

    model_path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    tokens = eval_tokens(load_text("wikitext2", "test", DATA), tok, 2048)
    torch.set_num_threads(2)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        dense = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        row = {"model": f"dense {str(dtype).split('.')[-1]} torch",
               "file_bytes": files_bytes(model_path)}
        if dtype == torch.bfloat16:
            row["eval_s"], row["ppl"] = eval_seconds(dense, tokens, args.windows, False)
        row.update(speeds(dense, tokens))
        rows.append(row)
        print(row, flush=True)
        del dense
    for k, spec in enumerate(m for m in args.methods.split(",") if m):
        method, *extra = spec.split("+")
        path = saved_model(model_path, method, args.work, extra)
        model = binllm.load(path, dtype=getattr(torch, args.packed_dtype)).eval()
        name = f"binllm {spec}" + ("" if args.packed_dtype == "bfloat16" else
                                   f" ({args.packed_dtype})")
        row = {"model": name, "file_bytes": files_bytes(path)}
        row["eval_s"], row["ppl"] = eval_seconds(model, tokens, args.windows, True)
        if k == 0 and args.kernel_windows:
            secs, _ = eval_seconds(model, tokens, args.kernel_windows, False)
            row["eval_s_kernels_per_window"] = secs / args.kernel_windows
        row.update(speeds(model, tokens))
        rows.append(row)
        print(row, flush=True)
        if args.int8_prefill:
            rows.append(int8_row(model, f"{name} --prefill int8", row["file_bytes"], tokens,
                                 args.windows))
            print(rows[-1], flush=True)
        del model
    rows += llama_cpp_rows(args.gguf, tokens)
    fp_eval = rows[0]["eval_s"]
    wait_policy = WAIT_POLICY
    md = ["# SmolLM2-135M whole-model runtime (one run, same machine)", "",
          f"Evaluation: wikitext2, {args.windows} windows of 2048; decode: {NEW_TOKENS} "
          f"single-token steps after a {PROMPT_TOKENS}-token prompt (its forward untimed); "
          f"prompt: {PREFILL_TOKENS} tokens.", "",
          "Decode: binllm's lean loop (llama.cpp: its own); in brackets transformers' "
          "`generate` on the same model.", "",
          f"OMP_WAIT_POLICY: {wait_policy}.", "",
          md_row("model", "MiB", "eval s", "eval × FP", "ppl", "decode tok/s 1t", "2t",
                 "prompt tok/s 1t", "2t"),
          md_row(*["---"] * 9)]
    for r in rows:
        ev = r.get("eval_s")
        md.append(md_row(r["model"], f"{r['file_bytes'] / 2**20:.1f}",
                         f"{ev:.1f}" if ev else "", f"{ev / fp_eval:.2f}" if ev else "",
                         f"{r['ppl']:.2f}" if "ppl" in r else "",
                         *(decode_cell(r, t) for t in (1, 2)),
                         *(f"{r.get(k, float('nan')):.1f}" for k in
                           ("prompt_tps_1t", "prompt_tps_2t"))))
    for r in rows:
        per = r.get("eval_s_kernels_per_window")
        if per:
            md.append(f"\n{r['model']}: whole-model kernel forward {per:.2f} s per window "
                      f"({args.windows} windows ≈ {per * args.windows:.0f} s).")
    build = llama_cpp_build() if args.gguf else None
    if build:
        md.append(f"\nllama.cpp: {build}")
    write_results(args.stem, {"rows": rows, "windows": args.windows, "torch": torch.__version__,
                              "omp_wait_policy": wait_policy, "llama_cpp": build},
                  "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
