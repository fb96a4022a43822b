"""Decode speed of several models in alternating processes: a fair comparison on a VM whose
speed drifts between runs.

Each model runs in its own process (its own threads, nothing left spinning from another
runtime), one after the other, for --rounds rounds: best-of---repeats tokens/s of greedy
decode, 128 single-token steps after the first 32 tokens of wikitext2 test (the prompt's
forward untimed), at 1 and 2 threads. A binllm directory (or "dense") runs binllm's lean
decode loop (`binllm generate`'s), a .gguf runs llama.cpp (llama-cpp-python). Compare within a
round: the pairs saw the same machine state.

    python benchmarks/bench_decode_rounds.py MODEL [MODEL ...] [--rounds 3] [--stem NAME]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, generation_speed, md_row, write_results  # noqa: E402
from bench_real import MODEL, model_dir  # noqa: E402
from bench_real_runtime import NEW_TOKENS, PROMPT_TOKENS, llama_cpp_decode_seconds  # noqa: E402


def tokens():
    from transformers import AutoTokenizer

    from binllm.evaluation.data import eval_tokens, load_text

    tok = AutoTokenizer.from_pretrained(model_dir(MODEL))
    return eval_tokens(load_text("wikitext2", "test", DATA), tok, 2048)


def llama_speeds(path: str, ids: list[int], repeats: int) -> dict[int, float]:
    from binllm.export.llama_runtime import llama_cpp_model

    out = {}
    for threads in (1, 2):
        llm = llama_cpp_model(Path(path), n_ctx=2048, n_threads=threads, n_batch=512)
        out[threads] = NEW_TOKENS / min(llama_cpp_decode_seconds(llm, ids)
                                        for _ in range(repeats))
        del llm
    return out


def load_model(path: str):
    """The model a command-line entry names: "dense" the bf16 original, else a binllm directory;
    in eval mode."""
    import torch

    if path == "dense":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir(MODEL), dtype=torch.bfloat16).eval()
    import binllm

    return binllm.load(path).eval()


def torch_speeds(path: str, ids, repeats: int) -> dict[int, float]:
    import torch

    model = load_model(path)
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out[threads] = generation_speed(model, ids[:, :PROMPT_TOKENS], NEW_TOKENS,
                                        repeats=repeats, loop="lean")
    return out


def child(path: str, repeats: int) -> None:
    """One model's speeds, printed as one JSON line (the parent reads the last line)."""
    ids = tokens()
    speeds = (llama_speeds(path, ids[0].tolist(), repeats) if path.endswith(".gguf")
              else torch_speeds(path, ids, repeats))
    print(json.dumps(speeds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="binllm directories, 'dense', or .gguf files")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stem", default="decode_rounds")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.models[0], args.repeats)
        return 0
    rounds = []
    for r in range(args.rounds):
        row = {}
        for m in args.models:
            out = subprocess.run([sys.executable, __file__, "--child", "--repeats",
                                  str(args.repeats), m], check=True, capture_output=True,
                                 text=True).stdout
            row[m] = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
            print(f"round {r + 1}: {m}: {row[m]}", flush=True)
        rounds.append(row)
    names = [Path(m).name for m in args.models]
    md = ["# Decode tokens/s in alternating processes (SmolLM2-135M)", "",
          f"Greedy, {NEW_TOKENS} decode steps after a {PROMPT_TOKENS}-token prompt (its forward "
          f"untimed); best of {args.repeats} runs per cell; each model in its own process, in "
          "turn, each round.", "",
          md_row("round", *(f"{n} 1t / 2t" for n in names)),
          md_row(*["---"] * (len(names) + 1))]
    for r, row in enumerate(rounds):
        md.append(md_row(r + 1, *(f"{row[m][1]:.1f} / {row[m][2]:.1f}" for m in args.models)))
    write_results(args.stem, {"models": args.models, "repeats": args.repeats,
                              "new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_TOKENS,
                              "rounds": rounds}, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
