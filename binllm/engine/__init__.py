"""The calibration engine: from a model and calibration windows to codes, layer by layer.

`config` (the frozen, versioned `QuantizeConfig`, `RefineConfig`, `DistillConfig`), `checks`
(finite weights, skip names), `hessian` (H = 2/N ΣXᵀX, damping, the Cholesky factor of H⁻¹),
`reconstruct` (the one GPTQ-style reconstruction loop every method runs through), `walker`
(finding decoder layers and linears, capturing layer inputs, one layer on the device at a
time), `binarize` (`binarize_model`: the layer loop, reports), `destination` (where finished
codes go), `refine` (block-wise refinement against the FP layer), `distill` (all scales trained
against the FP model's logits after the layer loop), `outside` (the embeddings and lm_head as
q8 / q4 codes), `rotate` and `hadamard` (the residual stream rotation folded into the weights),
`journal` (resume: finished layers' codes kept on disk), `distributed` (torchrun ranks),
`single_process` (their one-process stand-in), `stream` and `stream_eval` (a safetensors
checkpoint binarized, or evaluated, with one decoder layer in memory at a time; a binarized
model evaluated layer by layer, each linear unpacked once), `memory` (what calibration holds
at once).

May import `binllm.methods`, `binllm.packed` (the journal's and the stream's packed layers),
`binllm.evaluation` (the streamed perplexity's window losses), `binllm.preflight`,
`binllm.safetensors_io` (the streamed checkpoint's reader), `binllm.atomic` and
`binllm.errors`; never the CLI (docs/layout.md, tests/test_imports.py).
"""
