"""Export of saved binllm directories to other runtimes' formats (`binllm export`).

target: where an export may be written (checked before any work) and `ExportError`;
gguf_export: llama.cpp's GGUF for LLaMA models whose binarized linears are Q1_0 codes
(`--method q1_0`), read through the loader's checks (`packed.checkpoint.read_verified`), with
the llama hyperparameters; gguf_tensors: Q1_0 blocks, the fallback types of linears Q1_0
cannot hold, q/k row permutation, `general.file_type`; vocab, gguf_vocab, gguf_bpe: the
tokenizer as GGUF holds it (sentencepiece "llama" or byte-level BPE "gpt2"); llama_runtime:
llama.cpp's own model of a GGUF, on its plain CPU kernels. Needs the optional `gguf` package
(and `llama-cpp-python` for llama_runtime). May import packed, atomic and errors.
"""
