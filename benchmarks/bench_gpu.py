"""Issue 10 §3 benchmark: the Triton sign-plane kernel on a GPU, batch-1 decode.

Measured when a CUDA device and Triton are present (otherwise the JSON and markdown say "not
measured: no GPU in this session" and nothing else):

- one 4096×4096 and one 11008×4096 linear with q1_0 codes (a sign bit + one fp16 α per 128
  weights), batch 1 and 16: Triton kernel (`binllm.kernels.triton_sign`) vs bf16 `F.linear` on
  the dequantized weight vs GemLite's A16W1 kernel (`pip install gemlite`; W = (q − z)·s with
  q ∈ {0, 1}, z = 0.5, s = 2α per group of 128: exactly the q1_0 weight) when importable;
- one 4096×4096 linear with BiLLM-shaped codes (3 salient columns per 128-column block at
  order 2, the rest split into two order-1 groups) through its kernel form
  (`binllm.kernels.triton_form`), batch 1 and 16, against bf16 `F.linear`;
- a LLaMA-7B-shaped stack of linears (32 layers × q/k/v/o 4096×4096, gate/up 11008×4096,
  down 4096×11008), one token through all 224 linears, eager and captured in a CUDA graph
  (launch overhead removed), for the same three paths.

The codes are synthesised (random signs, α ∈ [0.01, 0.03]): speed depends on the layout only.
Every path's output is checked against the bf16 reference first (relative error recorded).
Times are medians of CUDA-event timings after warm-up.

    python benchmarks/bench_gpu.py [--iters 50] [--layers 32] [--out-dir benchmarks/results]
Writes gpu.json and gpu.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
NOT_MEASURED = "not measured: no GPU in this session"
DEVICE = "cuda"  # where the benchmark runs (a module constant so a smoke run can use the CPU)
SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
STACK = ["q/k/v/o"] * 4 + ["gate/up"] * 2 + ["down"]  # one decoder layer's linears


def q1_0_layer(rows: int, cols: int, device, seed: int):
    """(layout, packed buffers) of random q1_0 codes on `device`."""
    from binllm.packed.layout import PackedLayout

    g = torch.Generator(device="cpu").manual_seed(seed)
    params = {"orders": [1], "n_salient": 0, "planes": 1, "block_size": 128, "mean": False,
              "column_scales": False, "salient_columns": 0, "scale_dtype": "float16"}
    layout = PackedLayout("binary", rows, cols, params)
    packed = {"signs0": torch.randint(0, 256, (rows * cols // 8,), generator=g,
                                      dtype=torch.uint8).to(device),
              "alpha": (torch.rand(1, rows, cols // 128, generator=g) * 0.02 + 0.01)
              .half().to(device)}
    return layout, packed


def gemlite_layer(layout, packed, W):
    """GemLite A16W1 of the same weight, or None when gemlite is not importable."""
    try:
        from gemlite import DType, GemLiteLinear
    except ImportError:
        return None
    from binllm.packed.layout import unpack

    codes = unpack(layout, packed)
    q = codes.signs[0].to(torch.uint8)  # (rows, cols) in {0, 1}
    alpha = codes.alpha[0, 0]  # (rows, nblk)
    lin = GemLiteLinear(1, group_size=128, in_features=layout.in_features,
                        out_features=layout.out_features, input_dtype=DType.BF16,
                        output_dtype=DType.BF16)
    lin.pack(q, (2 * alpha).to(torch.bfloat16), torch.full_like(alpha, 0.5).to(torch.bfloat16),
             None)
    return lin


def cuda_time(fn, iters: int) -> float:
    """Median milliseconds of fn() over `iters` CUDA-event timings after a warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graphed(fn):
    """fn captured in a CUDA graph (returns replay), or None when capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay
    except Exception as e:  # noqa: BLE001 - recorded, the eager number still stands
        print(f"graph capture failed: {type(e).__name__}: {e}")
        return None


def bench_layers(iters: int) -> list[dict]:
    from binllm.kernels.triton_sign import sign_linear
    from binllm.packed.layout import unpack

    rows_out = []
    for name, (R, K) in list(SHAPES.items())[:2]:
        layout, packed = q1_0_layer(R, K, DEVICE, seed=R)
        W = unpack(layout, packed).dequantize().to(torch.bfloat16)
        gl = gemlite_layer(layout, packed, W)
        for batch in (1, 16):
            x = torch.randn(batch, K, device=DEVICE, dtype=torch.bfloat16)
            ref = F.linear(x, W).float()
            paths = {"bf16 F.linear": lambda: F.linear(x, W)}
            for br in (8, 16, 32, 64):  # rows per program: the kernel's one tuning knob
                paths[f"triton q1_0, BLOCK_R={br}"] = \
                    lambda br=br: sign_linear(x, layout, packed, block_r=br)
            if gl is not None:
                paths["gemlite A16W1"] = lambda: gl(x)
            for label, fn in paths.items():
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                ms = cuda_time(fn, iters)
                rows_out.append({"shape": f"{R}x{K}", "batch": batch, "path": label,
                                 "ms": ms, "rel_err_vs_bf16": err})
                print(f"{R}x{K} batch {batch} {label}: {ms * 1000:.1f} µs (rel err {err:.1e})")
    return rows_out


def billm_like(rows: int, cols: int, seed: int):
    """Random BinaryCodes with BiLLM's layout: groups (salient 2, sparse 1, concentrated 1)."""
    from binllm.methods.codes import BinaryCodes, to_storage

    g = torch.Generator().manual_seed(seed)
    nblk = cols // 128
    sal = torch.zeros(cols, dtype=torch.bool)
    for b in range(nblk):
        sal[b * 128 + torch.randperm(128, generator=g)[:3]] = True
    rest = 1 + (torch.rand(rows, cols, generator=g) < 0.3).to(torch.uint8)  # sparse = 1
    group = torch.where(sal[None, :], torch.zeros_like(rest), rest)
    alpha = to_storage(torch.rand(3, 2, rows, nblk, generator=g) * 0.02 + 0.005)
    alpha[1:, 1] = 0
    return BinaryCodes(group=group, signs=torch.rand(2, rows, cols, generator=g) > 0.5,
                       alpha=alpha, mu=to_storage(torch.randn(3, rows, nblk, generator=g) * 1e-3),
                       beta=None, salient_cols=sal, orders=(2, 1, 1), n_salient=1,
                       block_size=128)


def bench_form(iters: int) -> list[dict]:
    from binllm.kernels.form import kernel_form
    from binllm.kernels.triton_form import form_matmul

    R, K = SHAPES["q/k/v/o"]
    codes = billm_like(R, K, seed=7)
    form = kernel_form(codes).to(DEVICE)
    W = codes.dequantize().to(DEVICE, torch.bfloat16)
    out = []
    for batch in (1, 16):
        x = torch.randn(batch, K, device=DEVICE, dtype=torch.bfloat16)
        ref = F.linear(x, W).float()
        for label, fn in {"bf16 F.linear": lambda: F.linear(x, W),
                          "triton form (billm-like)": lambda: form_matmul(form, x)}.items():
            err = ((fn().float() - ref).norm() / ref.norm()).item()
            ms = cuda_time(fn, iters)
            out.append({"shape": f"{R}x{K}", "batch": batch, "path": label, "ms": ms,
                        "rel_err_vs_bf16": err})
            print(f"billm-like batch {batch} {label}: {ms * 1000:.1f} µs (rel err {err:.1e})")
    return out


def bench_stack(iters: int, layers: int) -> list[dict]:
    from binllm.kernels.triton_sign import sign_linear
    from binllm.packed.layout import unpack

    q1, dense, gls = [], [], []
    for i in range(layers):
        for j, kind in enumerate(STACK):
            R, K = SHAPES[kind]
            layout, packed = q1_0_layer(R, K, DEVICE, seed=1000 * i + j)
            q1.append((layout, packed))
            dense.append(unpack(layout, packed).dequantize().to(torch.bfloat16))
            gls.append((gemlite_layer(layout, packed, dense[-1]), K))
    xs = {K: torch.randn(1, K, device=DEVICE, dtype=torch.bfloat16)
          for K in {k for _, k in SHAPES.values()}}
    paths = {"bf16 F.linear": lambda: [F.linear(xs[W.shape[1]], W) for W in dense],
             "triton q1_0": lambda: [sign_linear(xs[lay.in_features], lay, p) for lay, p in q1]}
    if all(g is not None for g, _ in gls):
        paths["gemlite A16W1"] = lambda: [g(xs[K]) for g, K in gls]
    weight_bytes = {"bf16 F.linear": sum(W.numel() * 2 for W in dense),
                    "triton q1_0": sum(sum(t.numel() * t.element_size() for t in p.values())
                                       for _, p in q1)}
    out = []
    for label, fn in paths.items():
        eager = cuda_time(fn, iters)
        replay = graphed(fn)
        graph_ms = cuda_time(replay, iters) if replay is not None else None
        out.append({"path": label, "layers": layers, "linears": len(dense), "eager_ms": eager,
                    "graph_ms": graph_ms, "weight_bytes": weight_bytes.get(label)})
        print(f"stack {label}: eager {eager:.3f} ms, graph {graph_ms} ms")
    return out


def write(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps(result, indent=2))
    lines = ["# GPU kernels (issue 10 §3)", "", f"Device: {result['device']}", ""]
    if not result["measured"]:
        lines += [f"**{NOT_MEASURED}.** Run `python benchmarks/bench_gpu.py` on a machine with "
                  "a CUDA GPU and Triton to fill this table (4096×4096 and 11008×4096 q1_0 "
                  "layers, a LLaMA-7B-shaped stack at batch 1, vs bf16 F.linear and GemLite "
                  "A16W1)."]
    else:
        lines += ["| shape | batch | path | µs | rel. err vs bf16 |", "|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['batch']} | {r['path']} | {r['ms'] * 1000:.1f} | "
                  f"{r['rel_err_vs_bf16']:.1e} |" for r in result["layers"]]
        lines += ["", f"LLaMA-7B-shaped stack, batch 1 ({result['stack'][0]['linears']} "
                  "linears, one token):", "", "| path | eager ms | CUDA graph ms |",
                  "|---|---|---|"]
        for r in result["stack"]:
            graph = "—" if r["graph_ms"] is None else f"{r['graph_ms']:.3f}"
            lines.append(f"| {r['path']} | {r['eager_ms']:.3f} | {graph} |")
    (out_dir / "gpu.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
        have_triton = True
    except ImportError:
        have_triton = False
    result = {"measured": False, "device": platform.processor() or platform.machine(),
              "torch": torch.__version__}
    if not (torch.cuda.is_available() and have_triton):
        result["reason"] = NOT_MEASURED if not torch.cuda.is_available() else \
            "not measured: triton is not installed"
        print(result["reason"])
        write(args.out_dir, result)
        return 0
    result.update(measured=True, device=torch.cuda.get_device_name(),
                  layers=bench_layers(args.iters) + bench_form(args.iters),
                  stack=bench_stack(args.iters, args.layers))
    write(args.out_dir, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
