"""Export of saved binllm directories to other runtimes' formats (`binllm export`).

gguf_export: llama.cpp's GGUF for LLaMA models whose binarized linears are Q1_0 codes
(`--method q1_0`), with the llama hyperparameters and q/k row permutation; gguf_vocab: the
sentencepiece vocabulary GGUF's "llama" tokenizer needs. Needs the optional `gguf` package.
"""
