"""What lies outside the decoder layers, quantized: the token embeddings and the lm_head.

    report = quantize_outside(model, embeddings="q4", lm_head="q4")

Each is kept as loaded ("keep") or rounded to nearest ("q8", "q4") on a uniform asymmetric
grid per row and group of 32 columns (`UniformCodes`: fp16 scale, integer zero point; 8.75
and 4.625 stored bits per weight), the grid of llama.cpp's Q8_1 / Q4_1 families. The
embedding becomes a `PackedEmbedding` (its lookup unpacks only the rows it needs), an
untied lm_head a `BinaryLinear`.

Tied embeddings (the lm_head's weight is the embedding table, as in SmolLM2 and Llama-3.2):
with one option for both, the table is quantized once and the lm_head becomes a `TiedHead`
reading the embedding's codes, so the table is stored once. With different options the two
are untied first: each is stored on its own, in its own type (a kept table beside a q4
head costs the table twice: pick the same option for both to avoid it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..methods import get_method
from ..packed.embedding import PackedEmbedding, TiedHead
from ..packed.layers import BinaryLinear, set_submodule
from .config import ConfigError
from .reconstruct import reconstruct

log = logging.getLogger(__name__)

OUTSIDE_BITS = {"keep": None, "q8": 8, "q4": 4}  # option -> bits of the uniform grid
GROUPSIZE = 32


@dataclass(frozen=True)
class OutsideReport:
    """What quantize_outside did: option per tensor, whether one table serves both, and the
    stored bits of each quantized module (by name)."""

    embeddings: str
    lm_head: str
    tied: bool
    stored_bits: dict[str, int] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"embeddings": self.embeddings, "lm_head": self.lm_head, "tied": self.tied,
                "stored_bits": dict(self.stored_bits), "parameters": dict(self.parameters)}


def rtn_uniform(W: Tensor, bits: int, groupsize: int = GROUPSIZE):
    """UniformCodes of W (rows, cols) rounded to nearest, `bits` per weight, per row and group
    (scales fp16 as stored)."""
    method = get_method("gptq", {"bits": bits, "groupsize": groupsize})
    return reconstruct(W.detach().float(), None, method, feedback="none").codes


def quantize_outside(model: nn.Module, embeddings: str = "keep",
                     lm_head: str = "keep") -> OutsideReport | None:
    """Quantize the input embeddings and the output layer in place (module docstring);
    None when both are kept."""
    for name, value in (("embeddings", embeddings), ("lm_head", lm_head)):
        if value not in OUTSIDE_BITS:
            raise ConfigError(f"{name}={value!r}: use one of {', '.join(OUTSIDE_BITS)}")
    if embeddings == lm_head == "keep":
        return None
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if not isinstance(emb, nn.Embedding) or (lm_head != "keep" and not isinstance(head,
                                                                             nn.Linear)):
        raise ConfigError(f"{type(model).__name__}: embeddings/lm_head options need an "
                          "nn.Embedding input and an nn.Linear output layer")
    tied = head is not None and _same_tensor(head.weight, emb.weight)
    report = OutsideReport(embeddings, lm_head, tied and embeddings == lm_head)
    if tied and embeddings != lm_head:  # two types: two tables
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    if tied or embeddings != lm_head:
        model.config.tie_word_embeddings = False  # the saved model ties through TiedHead
    packed_emb = None
    if embeddings != "keep":
        codes = rtn_uniform(emb.weight, OUTSIDE_BITS[embeddings])
        packed_emb = PackedEmbedding.from_codes_like(codes, emb).to(emb.weight.device)
        _put(model, names[id(emb)], packed_emb, report)
    if lm_head != "keep" and report.tied:  # no tensors of its own: nothing to count
        set_submodule(model, names[id(head)], TiedHead(packed_emb))
    elif lm_head != "keep":
        codes = rtn_uniform(head.weight, OUTSIDE_BITS[lm_head])
        _put(model, names[id(head)],
             BinaryLinear.from_codes(codes, head.bias).to(head.weight.device), report)
    log.info("outside the layers: embeddings %s, lm_head %s%s", embeddings, lm_head,
             " (one table)" if report.tied else "")
    return report


def _put(model: nn.Module, name: str, module: BinaryLinear, report: OutsideReport) -> None:
    set_submodule(model, name, module)
    report.stored_bits[name] = module.stored_bits()
    report.parameters[name] = module.in_features * module.out_features


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.device == b.device and a.device.type != "meta"
                      and a.data_ptr() == b.data_ptr() and a.shape == b.shape)
