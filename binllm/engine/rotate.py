"""Rotate a model's residual stream, folded into its weights (QuaRot / SpinQuant's R1).

With RMSNorm, norm(h R) = norm(h) R for an orthogonal R once the norm's weight is folded into
the linears that read its output. So, with h' = h R the rotated residual stream:

    embeddings           E' = E R
    readers (q/k/v, gate/up, lm_head after its norm)   W' = W · diag(g) · R
    writers (o_proj, down_proj)                        W' = Rᵀ W,  b' = Rᵀ b
    every RMSNorm                                      g' = 1

and the model computes the same function (to round-off) while its linears see rotated,
less heavy-tailed weights. The result is still a standard model of its family. Tied
embeddings are untied: the final norm's weight folds into lm_head but not into the
embeddings.

The layers must be LLaMA-shaped (input_layernorm → self_attn.{q,k,v}_proj, self_attn.o_proj,
post_attention_layernorm → mlp.{gate,up}_proj, mlp.down_proj, and no other norm); other
families are refused with `CannotRotate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ConfigError
from .hadamard import rotation
from .walker import find_decoder_layers, get_path

log = logging.getLogger(__name__)

READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


class CannotRotate(ConfigError):
    """The model's layers are not of a shape whose residual stream rotation folds into."""


@dataclass(frozen=True)
class RotationReport:
    width: int
    how: str        # which orthogonal matrix: Hadamard construction or random orthogonal
    untied: bool    # lm_head was tied to the embeddings and is now a tensor of its own
    seed: int


def _norm_weight(norm: nn.Module, width: int) -> tuple[Tensor, Tensor]:
    """(g, identity): the norm's effective per-channel gain (float64) and the weight that
    makes that gain 1.

    Probed, not assumed: RMSNorm of an all-ones vector is its gain (up to √(1 + ε)), which
    tells LLaMA's x · w (identity 1) from Gemma's x · (1 + w) (identity 0)."""
    w = norm.weight.data
    ones = torch.ones(1, width, dtype=w.dtype, device=w.device)
    for offset, identity in ((0.0, torch.ones_like(w)), (1.0, torch.zeros_like(w))):
        norm.weight.data = identity
        try:
            gain = norm(ones).float()
        finally:
            norm.weight.data = w
        if torch.allclose(gain, torch.ones_like(gain), atol=1e-2):
            return w.double() + offset, identity
    raise CannotRotate(f"{type(norm).__name__} is not an RMSNorm whose weight scales its "
                       "output; rotate=hadamard cannot fold it; quantize without rotate")


def check_rotatable(model: nn.Module) -> None:
    """Raise CannotRotate (one line) unless every layer is LLaMA-shaped (module docstring)."""
    _, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        norms = {n for n, m in layer.named_modules() if "norm" in type(m).__name__.lower()
                 and n.count(".") == 0}
        needed = [p for norm, readers in READERS.items() for p in (norm, *readers)] + [*WRITERS]
        missing = [p for p in needed if get_path(layer, p) is None]
        if missing or norms - set(READERS):
            what = (f"has no {', '.join(missing)}" if missing
                    else f"has the norms {', '.join(sorted(norms - set(READERS)))}")
            raise CannotRotate(f"rotate=hadamard folds into LLaMA-shaped layers "
                               f"(RMSNorm → q/k/v, o_proj, RMSNorm → gate/up, down_proj); "
                               f"layer {i} of {type(model).__name__} {what}; "
                               "quantize it without rotate")
        for norm in READERS:
            if getattr(get_path(layer, norm), "bias", None) is not None:
                raise CannotRotate(f"layer {i}'s {norm} has a bias (a LayerNorm): "
                                   "rotate=hadamard needs RMSNorm; quantize without rotate")


def _final_norm(model: nn.Module) -> nn.Module:
    """The norm applied right before lm_head: `<base model>.norm` (LLaMA, Qwen2, Mistral)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    norm = getattr(base, "norm", None)
    if norm is None:
        raise CannotRotate(f"{type(model).__name__} has no final norm at "
                           f"{getattr(model, 'base_model_prefix', 'model')}.norm; "
                           "quantize it without rotate")
    return norm


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> RotationReport:
    """Fold every RMSNorm into the linears after it and rotate the residual stream in place."""
    check_rotatable(model)
    emb = model.get_input_embeddings()
    lm_head = model.get_output_embeddings()
    width = emb.weight.shape[1]
    R, how = rotation(width, seed)  # (d, d) float64

    def read(linear: nn.Linear, g: Tensor) -> None:  # W' = W diag(g) R
        W = linear.weight.data
        linear.weight.data = ((W.double() * g[None, :]) @ R).to(W.dtype)

    def write(linear: nn.Linear) -> None:  # W' = Rᵀ W, b' = Rᵀ b
        W = linear.weight.data
        linear.weight.data = (R.T @ W.double()).to(W.dtype)
        if linear.bias is not None:
            linear.bias.data = (R.T @ linear.bias.data.double()).to(linear.bias.dtype)

    _, layers = find_decoder_layers(model)
    for layer in layers:
        for norm_name, readers in READERS.items():
            norm = get_path(layer, norm_name)
            g, identity = _norm_weight(norm, width)
            for p in readers:
                read(get_path(layer, p), g)
            norm.weight.data = identity
        for p in WRITERS:
            write(get_path(layer, p))
    final = _final_norm(model)
    g, identity = _norm_weight(final, width)
    tied = lm_head.weight is emb.weight
    E = emb.weight.data
    head = lm_head.weight.data.double() * g[None, :] @ R
    emb.weight.data = (E.double() @ R).to(E.dtype)
    if tied:
        lm_head.weight = nn.Parameter(head.to(E.dtype), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = []
    else:
        lm_head.weight.data = head.to(lm_head.weight.dtype)
    final.weight.data = identity
    report = RotationReport(width=width, how=how, untied=tied, seed=seed)
    log.info("residual stream rotated: %s, width %d%s", how, width,
             "; lm_head untied from the embeddings" if tied else "")
    return report
