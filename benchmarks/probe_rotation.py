"""Where does rotation help which method? Layer-wise probes on SmolLM2-135M.

Two rotations, measured by the calibration-weighted relative output error
tr(E H Eᵀ) / tr(W H Wᵀ) of a linear after each method's one-shot `reconstruct` (no refinement),
H from the FP model's inputs to that linear on the benchmark protocol's calibration windows
(wikitext2 validation, seed 0):

- **R1**, binllm's folded residual rotation (`rotate_model`, `--rotate hadamard`): q_proj and
  gate_proj of every `--every-r1`-th layer, in the model as it is and in the rotated model.
- **R4**, QuaRot's online Hadamard on down_proj's input, which binllm does not implement:
  down_proj of every `--every-r4`-th layer of the rotated model, with W and H as they are and
  with W R, Rᵀ H R. R4 would fold W R into down_proj and multiply every token's 1,536-wide MLP
  activation by R at run time; its **cost** is timed as seconds of x ↦ x R for one token (the
  decode case) in the Kronecker form a runtime would use, R = D (S₁₂₈ ⊗ P₁₂) / √1536 (the
  128 × 128 Sylvester and 12 × 12 Paley matrices applied one after the other, torch ops),
  beside one decode call of a packed q1_0 down_proj (1536 → 576).

    python benchmarks/probe_rotation.py [--methods q1_0,arb-llm-rc] [--nsamples 8]
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


def input_hessians(model, keys, batches) -> dict[tuple[int, str], torch.Tensor]:
    """H = Σ xᵀx (cols, cols) float64 of the inputs of each (layer index, module path)."""
    H: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def add(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            H[key] = H[key] + x.T @ x if key in H else x.T @ x
        return add

    handles = [model.model.layers[i].get_submodule(path).register_forward_pre_hook(hook((i, path)))
               for i, path in keys]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    return H


def error(W: torch.Tensor, H: torch.Tensor, method: str) -> float:
    """The relative output error of `method`'s one-shot codes for W (float64) under H."""
    from binllm.engine.reconstruct import reconstruct
    from binllm.methods import get_method

    Q = reconstruct(W.float(), H.float(), get_method(method)).Q.double()
    return relative_output_error(W, Q, H)


def weight(model, key) -> torch.Tensor:
    i, path = key
    return model.model.layers[i].get_submodule(path).weight.detach().double()


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
    ap.add_argument("--methods", default="q1_0,block-sign,arb-llm-rc,billm")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--every-r1", type=int, default=5, help="probe R1 on every N-th layer")
    ap.add_argument("--every-r4", type=int, default=3, help="probe R4 on every N-th layer")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from binllm.engine.rotate import rotate_model
    from binllm.evaluation.data import calibration_batches, load_text

    path = model_dir(args.model)
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    methods = args.methods.split(",")
    batches = calibration_batches(load_text("wikitext2", "validation", DATA),
                                  AutoTokenizer.from_pretrained(path), args.nsamples, 2048, seed=0)
    model = load()
    n = len(model.model.layers)
    r1_keys = [(i, p) for i in range(0, n, args.every_r1)
               for p in ("self_attn.q_proj", "mlp.gate_proj")]
    H_plain = input_hessians(model, r1_keys, batches)
    W_plain = {k: weight(model, k) for k in r1_keys}
    model = load()
    rotation = rotate_model(model)
    r4_keys = [(i, "mlp.down_proj") for i in range(0, n, args.every_r4)]
    H_rot = input_hessians(model, r1_keys + r4_keys, batches)
    R = r4_matrix()
    r1, r4 = [], []
    for name in methods:
        for k in r1_keys:
            W = weight(model, k)
            row = {"method": name, "layer": k[0], "linear": k[1],
                   "plain": error(W_plain[k], H_plain[k], name), "r1": error(W, H_rot[k], name)}
            r1.append(row)
            print(f"R1 {name} {k}: {row['plain']:.4f} → {row['r1']:.4f}", flush=True)
        for k in r4_keys:
            W, H = weight(model, k), H_rot[k]
            row = {"method": name, "layer": k[0], "linear": k[1], "r1": error(W, H, name),
                   "r1_r4": error(W @ R, R.T @ H @ R, name)}
            r4.append(row)
            print(f"R4 {name} {k}: {row['r1']:.4f} → {row['r1_r4']:.4f}", flush=True)
    cost = timing()
    us = {k: f"{v * 1e6:.1f} µs" for k, v in cost.items()}
    md = ["# Rotation probes: which method does rotation help, SmolLM2-135M", "",
          f"H from {args.nsamples} × 2048 calibration tokens (wikitext2 validation, seed 0), FP "
          "inputs. Relative output error tr(E H Eᵀ) / tr(W H Wᵀ), one-shot (no refinement). "
          f"R1: binllm's folded residual rotation ({rotation.how}).", "",
          "## R1 (`--rotate hadamard`): q_proj and gate_proj, as they are and rotated", "",
          md_row("method", "layer", "linear", "plain", "R1", "R1 / plain"),
          md_row("---", "---", "---", "---", "---", "---")]
    md += [md_row(r["method"], r["layer"], r["linear"], f"{r['plain']:.4f}", f"{r['r1']:.4f}",
                  f"{r['r1'] / r['plain']:.3f}") for r in r1]
    md += ["", "## R4 (not implemented): down_proj of the R1-rotated model, without and with an "
           "online Hadamard on its input", "",
           md_row("method", "layer", "R1", "R1 + R4", "R4 / R1"),
           md_row("---", "---", "---", "---", "---")]
    md += [md_row(r["method"], r["layer"], f"{r['r1']:.4f}", f"{r['r1_r4']:.4f}",
                  f"{r['r1_r4'] / r['r1']:.3f}") for r in r4]
    md += ["", f"R4's decode cost, one token, one thread: x ↦ x R {us['r4_seconds']} (torch ops) "
           f"against a packed q1_0 down_proj call {us['q1_0_down_proj_seconds']}."]
    write_results("probe_rotation", {"rotation": rotation.how, "nsamples": args.nsamples,
                                     "r1": r1, "r4": r4, **cost}, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
