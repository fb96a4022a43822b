"""Packed token embeddings, and the output layer that shares their table.

`PackedEmbedding` stands in for an nn.Embedding whose table E (vocab, hidden) is stored as codes
(the q8 / q4 options are `UniformCodes`, 32 columns per group). It is a `BinaryLinear` (the
table is Ŵ: same buffers, layout record, save, load and inspect) whose forward looks token ids
up: only the rows of the ids are unpacked (a uniform layout's rows are whole bytes when
hidden · bits is a multiple of 8; other layouts dequantize the table).

`TiedHead` is the output layer of a model whose lm_head shares that table (tied embeddings):
y = x Eᵀ from the embedding's codes, with no tensors of its own, so the table is stored once.
It holds the embedding by reference, not as a submodule: the state dict names the table once.
An 8-bit (q8) table is read in place from its packed bytes: at decode by a GEMV
(`binllm.kernels.uniform8_linear`), a bf16 prompt of DENSE_TOKENS or more by rows rebuilt in
bf16 and the bf16 GEMM (`binllm.kernels.uniform8_linear_bf16`); other tables compute decode
through their kernel form and a prompt through the dequantized table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import form_linear, uniform8_linear, uniform8_linear_bf16
from .layers import BinaryLinear, replace_linears, set_submodule
from .formats import uniform_rows
from .packing import PackingError

# inputs of at least this many tokens go through the dequantized table (one unpack, then a
# dense matmul); fewer (decode) through the kernels
DENSE_TOKENS = 16


class PackedEmbedding(BinaryLinear):
    """nn.Embedding from packed codes (module docstring); `dtype`: of the looked-up rows."""

    def __init__(self, layout, bias: bool = False, *, dtype: torch.dtype = torch.float32,
                 **kwargs):
        if bias:
            raise ValueError("an embedding table has no bias")
        super().__init__(layout, False, **kwargs)
        self.dtype = dtype

    @classmethod
    def from_codes_like(cls, codes, embedding: nn.Embedding) -> PackedEmbedding:
        """A PackedEmbedding holding `codes`, in place of `embedding` (rows in its dtype)."""
        new = cls.from_codes(codes)
        new.dtype = embedding.weight.dtype
        return new

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def rows(self, ids: Tensor) -> Tensor:
        """E[ids] (n, hidden) fp32 for distinct ids (n,): only those rows are unpacked."""
        lay = self.layout
        codes = None if lay.format != "uniform" else uniform_rows(
            self.packed(), self.out_features, self.in_features, lay.params, ids)
        return self.dequantize()[ids] if codes is None else codes.dequantize()

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        if flat.numel() == 1:  # a decode step: its one row, no deduplication
            return self.rows(flat).to(self.dtype).reshape(*ids.shape, self.in_features)
        distinct, inverse = torch.unique(flat, return_inverse=True)
        E = self.rows(distinct).to(self.dtype)  # (n, hidden)
        return E[inverse].reshape(*ids.shape, self.in_features)

    def prepare(self) -> None:
        """Nothing to derive: the lookup reads the buffers (they stay resident)."""

    def _reads_buffers(self) -> bool:
        return True

    def _apply(self, fn, recurse: bool = True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # follows .to(dtype) / .half()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.layout.format}"


class TiedHead(nn.Module):
    """lm_head computing y = x Eᵀ (+ nothing) from a PackedEmbedding's codes (module docstring)."""

    def __init__(self, embedding: PackedEmbedding):
        super().__init__()
        self.__dict__["table"] = embedding  # a reference, not a submodule: stored once
        self.in_features, self.out_features = embedding.in_features, embedding.out_features

    @property
    def layout(self):
        return self.table.layout

    def forward(self, x: Tensor) -> Tensor:
        if self.table.dense_held:  # the table held dense (`hold_dense`): one unpack for many calls
            return self.table.dense_linear(x)
        y = self.in_place(x) if self.table.kernels else None
        if y is not None:
            return y
        tokens = x.numel() // self.in_features
        if tokens >= DENSE_TOKENS or not self.table.kernels:
            return F.linear(x, self.table.dequantize().to(device=x.device, dtype=x.dtype))
        return form_linear(self.table.kernel_form(), x)

    def in_place(self, x: Tensor) -> Tensor | None:
        """x Eᵀ from the table's packed bytes where its codes are 8-bit uniform (q8) and a
        compiled kernel computes x (CPU, fp32, bf16 or fp16, no gradient wanted), else None
        (the caller's form or dense path): fewer than DENSE_TOKENS tokens by the GEMV
        (`binllm.kernels.uniform8_linear`), a bf16 prompt by rows rebuilt in bf16 and the bf16
        GEMM (`binllm.kernels.uniform8_linear_bf16`: F.linear(x, E.to(torch.bfloat16)))."""
        lay = self.table.layout
        if lay.format != "uniform" or int(lay.params["bits"]) != 8:
            return None
        t = self.table.packed()
        args = t["q"], t["scale"], t["zero"], int(lay.params["groupsize"]), x
        if x.numel() // self.in_features < DENSE_TOKENS:
            return uniform8_linear(*args)
        return uniform8_linear_bf16(*args)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied"


def tied_heads(model: nn.Module) -> dict[str, str]:
    """{lm_head name: embedding name} of every TiedHead (quantization_config records it)."""
    names = {id(m): n for n, m in model.named_modules()}
    return {n: names[id(m.table)] for n, m in model.named_modules() if isinstance(m, TiedHead)}


def tie_heads(model: nn.Module, heads: dict[str, str]) -> None:
    """Put a TiedHead at each recorded lm_head name, reading the named PackedEmbedding."""
    for head, table in heads.items():
        try:
            emb = model.get_submodule(table)
        except AttributeError:
            emb = None
        if not isinstance(emb, PackedEmbedding):
            raise PackingError(f"quantization_config ties {head} to {table}, which is a "
                             f"{type(emb).__name__}, not a packed embedding")
        set_submodule(model, head, TiedHead(emb))


def outside_layouts(model: nn.Module, inside: str) -> dict:
    """{name: layout} of the packed modules not under `inside` (the decoder layers' path): a
    PackedEmbedding, a packed lm_head."""
    return {n: m.layout for n, m in model.named_modules()
            if isinstance(m, BinaryLinear) and not n.startswith(inside + ".")}


def replace_packed(model: nn.Module, layouts: dict, tied: dict[str, str] | None = None, *,
                   device: torch.device | str | None = None) -> None:
    """Swap in empty packed modules for the names in `layouts` (an nn.Embedding becomes a
    PackedEmbedding, an nn.Linear a BinaryLinear: `replace_linears`), then the TiedHeads of
    `tied` ({lm_head name: embedding name}, quantization_config's `tied_heads`)."""
    embeddings = {}
    for name, layout in layouts.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            continue  # replace_linears names it in its refusal
        if isinstance(old, nn.Embedding):
            if (old.num_embeddings, old.embedding_dim) != (layout.out_features,
                                                           layout.in_features):
                raise PackingError(f"{name}: the model has an embedding table "
                                   f"({old.num_embeddings}, {old.embedding_dim}), config.json "
                                   f"stores ({layout.out_features}, {layout.in_features})")
            embeddings[name] = PackedEmbedding(layout, device=device, dtype=old.weight.dtype)
    for name, module in embeddings.items():
        set_submodule(model, name, module)
    replace_linears(model, {n: lay for n, lay in layouts.items() if n not in embeddings},
                    device=device)
    tie_heads(model, tied or {})
