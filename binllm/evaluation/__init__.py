"""Data and evaluation: calibration and test text, perplexity, lm-eval.

`data` loads the local datasets (WikiText-2, PTB, C4, TinyStories, or a .txt/.jsonl file) and
cuts calibration and evaluation windows; `perplexity` is the GPTQ protocol; `harness` runs
lm-evaluation-harness tasks on an in-memory model. Imports nothing else of binllm.
"""
