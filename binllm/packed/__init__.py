"""The packed on-disk format and the layers that compute from it.

`packing` holds the pure pack/unpack primitives (bit planes, n-bit integer streams, exact
float casts) and the `CodesFormat` contract, importing no format; `formats` registers the
stored tensors of each codes type on top of them; `layout` is the per-linear `PackedLayout`
record of config.json with `pack`/`unpack` through the registry. `layers` is `BinaryLinear`,
`embedding` the packed embedding table (`PackedEmbedding`) and the lm_head tied to it
(`TiedHead`),
`checkpoint` saves and loads whole directories (atomically; `release` and `source` let a
loaded layer hold its kernel form alone, its codes read back from the shard on demand),
`writer` writes their shards tensor by tensor, `saved_dir` reads and verifies them, `output`
checks where a directory may be written, `hf_integration` and `hf_hook` let transformers'
`from_pretrained` load them. May import
`binllm.methods` (codes types), `binllm.kernels`, `binllm.preflight` (load-time size checks),
`binllm.safetensors_io` (the one safetensors reader), `binllm.atomic` and `binllm.errors`;
never the engine or CLI (docs/layout.md).
"""
