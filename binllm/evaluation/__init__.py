"""Data and evaluation: calibration and test text, perplexity, lm-eval.

`data` loads the local datasets (WikiText-2, PTB, C4, TinyStories, or a .txt/.jsonl file) and
cuts calibration and evaluation windows; `perplexity` is the GPTQ protocol (windows beyond the
model's context are refused); `generate` is timed text generation; `harness` runs
lm-evaluation-harness tasks on an in-memory model; `compare` runs several methods on one
protocol, each as a `python -m binllm` child process, and writes the comparison table and plot;
`compare_spec` parses its method specs and holds the protocol, `fingerprint` identifies its
inputs (model files, data files) so that a rerun on other inputs is refused.
Imports nothing else of binllm but `binllm.runtime` (generate's lean decode loop),
`binllm.atomic` and `binllm.errors`.
"""
