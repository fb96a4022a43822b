"""Fast forward paths of packed layers: compute y = Ŵx from the packed bits.

Every kernel here is a pure function of a layer's packed codes and its input, tested against
the plain path `codes.dequantize() @ x`. May import `binllm.methods` (codes types) and
`binllm.packed.packing` (bit primitives); `binllm.packed.layers` dispatches to it.
"""
