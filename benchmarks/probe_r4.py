"""Would an online Hadamard on down_proj's input (QuaRot's R4) pay, on SmolLM2-135M?

R4 rotates the MLP's inner activations (1,536 wide) before down_proj: down_proj's weight is
folded as W R and every token's input is multiplied by R at run time, so down_proj's weight is
quantized in a rotated basis where its columns are less heavy-tailed. This probe measures the
two sides without building the runtime op:

- **quality**: for every third decoder layer of the model after binllm's folded residual
  rotation (`rotate_model`, R1), the calibration-weighted relative output error
  tr(E H Eᵀ) / tr(W H Wᵀ) of down_proj after each method's `reconstruct`, with W and H as they
  are and with W R, Rᵀ H R (H from the FP model's down_proj inputs on the benchmark protocol's
  calibration windows, wikitext2 validation, seed 0). Layer-wise, one-shot, before refinement.
- **cost**: seconds of x ↦ x R for one token (the decode case) in the Kronecker form a runtime
  would use, R = D (S₁₂₈ ⊗ P₁₂) / √1536 (the 128 × 128 Sylvester and 12 × 12 Paley matrices
  applied one after the other, torch ops), beside one decode call of a packed q1_0 down_proj
  (1536 → 576).

    python benchmarks/probe_r4.py [--methods q1_0,arb-llm-rc] [--nsamples 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, md_row, relative_output_error, write_results  # noqa: E402
from bench_real import MODEL, model_dir  # noqa: E402

WIDTH, FAST, SMALL = 1536, 128, 12  # SmolLM2's intermediate width = 128 × 12


def r4_signs(seed: int = 0) -> torch.Tensor:
    """d (1536,) float64: R's seeded ±1 diagonal D."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (WIDTH,), generator=g, dtype=torch.float64) * 2 - 1


def r4_matrix(seed: int = 0) -> torch.Tensor:
    """R (1536, 1536) float64 orthogonal: D (S₁₂₈ ⊗ P₁₂) / √1536."""
    from binllm.engine.hadamard import paley, sylvester

    return r4_signs(seed)[:, None] * torch.kron(sylvester(FAST), paley(SMALL - 1)) / WIDTH ** 0.5


def apply_r4(x: torch.Tensor, d: torch.Tensor, S: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """x R for x (N, 1536): (x·d) reshaped (N, 128, 12), S₁₂₈ applied along 128 and P₁₂ along
    12 (Sᵀ X P with X's index i·12 + j, Sᵀ = S; two small products instead of one 1536² one)."""
    X = (x * d).reshape(-1, FAST, SMALL)
    return (S @ X @ P).reshape(-1, WIDTH) / WIDTH ** 0.5


def down_proj_hessians(model, layers, batches) -> dict[int, torch.Tensor]:
    """H = Σ xᵀx (1536, 1536) float64 of each listed layer's down_proj inputs."""
    H = {i: torch.zeros(WIDTH, WIDTH, dtype=torch.float64) for i in layers}

    def hook(i):
        def add(_module, args):
            x = args[0].reshape(-1, WIDTH).double()
            H[i].add_(x.T @ x)
        return add

    handles = [model.model.layers[i].mlp.down_proj.register_forward_pre_hook(hook(i))
               for i in layers]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    return H


def timing(repeats: int = 2000) -> dict:
    """Seconds per decode token of x ↦ x R and of a packed q1_0 down_proj, one thread."""
    from binllm.engine.hadamard import paley, sylvester
    from binllm.engine.reconstruct import reconstruct
    from binllm.kernels import form_linear, kernel_form
    from binllm.methods import get_method

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    R, d = r4_matrix(), r4_signs().float()
    S, P = sylvester(FAST).float(), paley(SMALL - 1).float()
    probe = torch.randn(3, WIDTH, generator=g, dtype=torch.float64)
    assert torch.allclose(apply_r4(probe.float(), d, S, P).double(), probe @ R, atol=1e-5)
    x = torch.randn(1, WIDTH, generator=g)
    W = torch.randn(576, WIDTH, generator=g) * 0.02
    form = kernel_form(reconstruct(W, None, get_method("q1_0"), feedback="none").codes)

    def per_call(fn) -> float:
        for _ in range(50):
            fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats

    with torch.inference_mode():
        return {"r4_seconds": per_call(lambda: apply_r4(x, d, S, P)),
                "q1_0_down_proj_seconds": per_call(lambda: form_linear(form, x))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--methods", default="q1_0,block-sign,arb-llm-rc")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--every", type=int, default=3, help="probe every N-th layer")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from binllm.engine.reconstruct import reconstruct
    from binllm.engine.rotate import rotate_model
    from binllm.evaluation.data import calibration_batches, load_text
    from binllm.methods import get_method

    path = model_dir(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rotation = rotate_model(model)
    source = load_text("wikitext2", "validation", DATA)
    batches = calibration_batches(source, tok, args.nsamples, 2048, seed=0)
    layers = list(range(0, len(model.model.layers), args.every))
    H = down_proj_hessians(model, layers, batches)
    R = r4_matrix()
    rows = []
    for name in args.methods.split(","):
        for i in layers:
            W = model.model.layers[i].mlp.down_proj.weight.detach().double()
            err = {}
            for key, Wr, Hr in (("plain", W, H[i]), ("r4", W @ R, R.T @ H[i] @ R)):
                Q = reconstruct(Wr.float(), Hr.float(), get_method(name)).Q.double()
                err[key] = relative_output_error(Wr, Q, Hr)
            rows.append({"method": name, "layer": i, "plain": err["plain"], "r4": err["r4"]})
            print(f"{name} layer {i}: {err['plain']:.4f} → {err['r4']:.4f}", flush=True)
    cost = timing()
    md = ["# R4 probe: an online Hadamard on down_proj's input, SmolLM2-135M", "",
          f"After the folded residual rotation ({rotation.how}); H from {args.nsamples} × 2048 "
          "calibration tokens (wikitext2 validation, seed 0), FP inputs. Relative output error "
          "tr(E H Eᵀ) / tr(W H Wᵀ) of down_proj, one-shot (no refinement).", "",
          md_row("method", "layer", "plain", "with R4", "R4 / plain"),
          md_row("---", "---", "---", "---", "---")]
    md += [md_row(r["method"], r["layer"], f"{r['plain']:.4f}", f"{r['r4']:.4f}",
                  f"{r['r4'] / r['plain']:.3f}") for r in rows]
    us = {k: f"{v * 1e6:.1f} µs" for k, v in cost.items()}
    md += ["", f"Decode cost, one token, one thread: x ↦ x R {us['r4_seconds']} (torch ops) "
           f"against a packed q1_0 down_proj call {us['q1_0_down_proj_seconds']}."]
    write_results("probe_r4", {"rotation": rotation.how, "nsamples": args.nsamples, "rows": rows,
                               **cost}, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
