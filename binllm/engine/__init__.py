"""The calibration engine: from a model and calibration windows to codes, layer by layer.

`config` (the frozen, versioned `QuantizeConfig`), `hessian` (H = 2/N ΣXᵀX, damping, the
Cholesky factor of H⁻¹), `reconstruct` (the one GPTQ-style reconstruction loop every method
runs through), `walker` (finding decoder layers and linears, capturing layer inputs, one layer
on the device at a time), `binarize` (`binarize_model`: the walk, reports), `journal`
(resume: finished layers' codes kept on disk) and `distributed` (torchrun ranks: window
shares, linear owners, the Hessian reduce and code broadcast), `stream` (a safetensors
checkpoint binarized with one decoder layer in memory at a time). May import `binllm.methods`, `binllm.packed`
(for the journal's packed layer files) and `binllm.atomic`; never the CLI.
"""
