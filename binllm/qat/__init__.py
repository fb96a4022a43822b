"""PB-LLM quantization-aware training.

`model` replaces binarizable linears by partially binarized ones (salient weights frozen at
high bit, α·sign(w) for the rest, straight-through gradients) and turns them back into codes;
`train` is the training loop with atomic, resumable checkpoints. May import the engine (for
Hessian masks), `binllm.methods`, `binllm.evaluation` and `binllm.atomic`; never the CLI.
"""
