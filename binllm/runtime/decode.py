"""A lean decode loop for the LLaMA family: the model's own modules, a preallocated cache.

At batch 1 a small model spends as long per token in transformers' generation machinery (cache
objects, mask construction, logits processors, per-layer keyword plumbing) as in its weights:
on SmolLM2-135M about 11 ms against 7 ms for its 210 packed linears. `LeanDecoder` computes
the same function as the model's forward with none of that work: it calls the model's own
embedding, linears (packed or dense), activation and lm_head, applies its RMSNorm weights and
its rotary embedding's cos/sin (computed once for every position the run needs), and keeps the
keys and values in one preallocated tensor per layer. Attention is
`F.scaled_dot_product_attention` with grouped heads, causal over the prompt, unmasked for a
single new token (it sees every cached position). On the CPU the glue between the linears is
fused where the compiled kernels compute it (`binllm.kernels.rms_norm`, and for one new token
`binllm.kernels.decode_attention`: rotary embedding, cache write and attention in one call),
else it runs as the torch ops below. Where every linear is packed (its compiled decode call) or a
plain `nn.Linear` and the activation is SiLU, a single new token goes through all the decoder
layers in one compiled call (`binllm.kernels.decode_layers`: the same functions in the same
order, so the same logits bit for bit, without a Python step between them; a linear with
forward hooks is not taken, and `fuse=False` runs the modules themselves). A linear that is a
plain bf16 `nn.Linear` (a dense model's, or a tied embedding table kept in bf16 as the lm_head)
is multiplied for one token by `binllm.kernels.dense_gemv`, which streams its weight at about
the rate one core reads memory (torch's bf16 GEMV reads a wide one at about half that), in
both.

Only families whose decoder layer is exactly that (pre-norm RMSNorm, rotary q/k, grouped-query
attention, gated MLP; no q/k norms, sliding windows or logit soft-capping) are taken:
`FAMILIES`; `unsupported(model)` says why another model is not, and `generate` then runs
transformers' `generate`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BinllmError
from ..kernels import decode_attention, decode_layers, dense_gemv, rms_norm

FAMILIES = ("llama", "mistral", "qwen2")


class DecodeError(BinllmError, ValueError):
    """A model or a length the lean decode loop cannot run."""

_ROPE_BY_LENGTH = ("dynamic", "longrope")  # cos/sin that depend on the sequence length


def unsupported(model: Any, max_len: int = 0) -> str | None:
    """Why `LeanDecoder` cannot run `model` over `max_len` positions (None: it can)."""
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "model_type", None)
    if family not in FAMILIES:
        return f"model type {family!r} is not one of {', '.join(FAMILIES)}"
    inner = getattr(model, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(inner, a) for a in parts) or not hasattr(model, "lm_head"):
        return "the model has no embed_tokens / layers / norm / rotary_emb / lm_head"
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    windowed = "sliding_attention" in types if types else family == "mistral"
    if windowed and window and max_len > window:
        return f"{max_len} positions exceed its sliding attention window ({window})"
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    kind = rope.get("rope_type", rope.get("type"))
    if kind in _ROPE_BY_LENGTH:
        return f"its rotary embedding ({kind}) depends on the sequence length"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1 splits its linears"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        plain = all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj",
                                               "head_dim", "scaling"))
        gated = all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        if not plain or not gated or hasattr(attn, "q_norm"):
            return "a decoder layer is not attention (q/k/v/o) + gated MLP"
    inv_freq = getattr(inner.rotary_emb, "inv_freq", None)
    head_dim = inner.layers[0].self_attn.head_dim if len(inner.layers) else 0
    if inv_freq is None or 2 * inv_freq.numel() != head_dim:
        return "its rotary embedding does not cover the whole head (partial rotary)"
    return None


def linear_call(module: Any, x: Tensor) -> tuple | None:
    """(decoder, weight, bias): how `decode_layers` computes module(t) for a token t like x
    (x's device and dtype): a packed layer's compiled call (its `decode_call`) or a plain
    nn.Linear's weight of x's dtype and device; None for any other module, one with forward
    hooks or whose forward is replaced on the instance (as accelerate's hooks do) included."""
    if "forward" in vars(module) or module._forward_hooks or module._forward_pre_hooks:
        return None
    if type(module).forward is nn.Linear.forward:
        w = module.weight
        return (None, w, module.bias) if (w.dtype, w.device) == (x.dtype, x.device) else None
    bind = getattr(module, "decode_call", None)
    call = None if bind is None else bind(x)
    return None if call is None else (call, None, module.bias)


def linear(module: Any, x: Tensor) -> Tensor:
    """module(x), a plain bf16 nn.Linear of one token by `dense_gemv` (as `decode_layers`
    computes it, so the loop gives the same logits however it runs)."""
    if x.shape[-2] == 1 and type(module).forward is nn.Linear.forward:
        call = linear_call(module, x)  # None: hooks, a replaced forward, another dtype
        if call is not None:
            y = dense_gemv(x, call[1], call[2])
            if y is not None:
                return y
    return module(x)


def norm(module: Any, x: Tensor) -> Tensor:
    """The model's RMSNorm (weight · x / rms(x), statistics in fp32, as its forward does)."""
    y = rms_norm(x, module.weight, module.variance_epsilon)  # fused, or None
    if y is not None:
        return y
    y = F.rms_norm(x.float(), x.shape[-1:], eps=module.variance_epsilon).to(x.dtype)
    return module.weight * y


class LeanDecoder:
    """Runs `model` token by token for one sequence of at most `max_len` positions; `fuse`:
    a single new token through all the decoder layers in one compiled call where it can."""

    def __init__(self, model: Any, max_len: int, fuse: bool = True):
        reason = unsupported(model, max_len)
        if reason:
            raise DecodeError(f"the lean decode loop cannot run this model: {reason}; run it "
                              "with transformers' generate (generate(loop='transformers'))")
        cfg, inner = model.config, model.model
        self.model, self.inner, self.max_len = model, inner, max_len
        attn = inner.layers[0].self_attn
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        weight = inner.norm.weight
        dtype, device = weight.dtype, weight.device
        cos, sin = inner.rotary_emb(torch.empty(0, dtype=dtype, device=device),
                                    torch.arange(max_len, device=device)[None])
        half = self.head_dim // 2
        self.cos, self.sin = cos[0], sin[0]  # (max_len, head_dim)
        # rotate_half(q) · sin == roll(q, half) · sin with sin's first half negated
        self.sin_rolled = torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1)
        shape = (1, self.kv_heads, max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in inner.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in inner.layers]
        self.length = 0  # positions cached
        self.fused = self.fused_layers(dtype, device) if fuse else None

    def fused_layers(self, dtype: torch.dtype, device: torch.device) -> Any:
        """`decode_layers` of this model's layers and caches, or None where it cannot run them:
        not on the CPU, an activation other than SiLU, a norm weight of another dtype, a linear
        neither packed nor a plain nn.Linear (`linear_call`), or no compiled extension."""
        if device.type != "cpu":
            return None
        probe = torch.empty(0, dtype=dtype, device=device)
        t = torch.linspace(-12, 12, 481).to(dtype)  # the activation must be F.silu on these
        layers = []
        for i, layer in enumerate(self.inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            norms = layer.input_layernorm, layer.post_attention_layernorm
            if not torch.equal(mlp.act_fn(t), F.silu(t)) \
                    or any(n.weight.dtype != dtype for n in norms):
                return None
            linears = tuple(linear_call(m, probe) for m in (
                attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                mlp.down_proj))
            if None in linears:
                return None
            layers.append((norms[0].weight, norms[0].variance_epsilon, norms[1].weight,
                           norms[1].variance_epsilon, linears, self.keys[i], self.values[i]))
        return decode_layers(layers, self.cos, self.sin, self.scale)

    @torch.no_grad()
    def __call__(self, ids: Tensor) -> Tensor:
        """Logits (vocab,) after the tokens `ids` (1, n) appended to the sequence so far
        (no gradient: the compiled kernels and the fused glue compute only without one)."""
        p, n = self.length, ids.shape[1]
        if p + n > self.max_len:
            raise DecodeError(f"{p + n} positions exceed this decoder's max_len="
                              f"{self.max_len}; build it with max_len={p + n} or more")
        h = self.inner.embed_tokens(ids)  # (1, n, d)
        if n == 1 and self.fused is not None and h.dtype == self.cos.dtype:
            h = self.fused(h, p)
        else:
            for i, layer in enumerate(self.inner.layers):
                h = h + self.attention(layer.self_attn, norm(layer.input_layernorm, h), i)
                x = norm(layer.post_attention_layernorm, h)
                mlp = layer.mlp
                h = h + linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, x))
                               * linear(mlp.up_proj, x))
        self.length = p + n
        return linear(self.model.lm_head, norm(self.inner.norm, h[:, -1:]))[0, -1]

    def attention(self, attn: Any, x: Tensor, i: int) -> Tensor:
        """o_proj of grouped-query attention of x (1, n, d) over the cache and x itself."""
        p, n, hd = self.length, x.shape[1], self.head_dim
        q, k, v = (linear(m, x) for m in (attn.q_proj, attn.k_proj, attn.v_proj))  # (1, n, ·)
        if n == 1:
            o = decode_attention(q, k, v, self.cos[p], self.sin[p], self.keys[i],
                                 self.values[i], p, self.scale)  # fused, or None
            if o is not None:
                return linear(attn.o_proj, o)
        rope = self.cos[p:p + n], self.sin_rolled[p:p + n]  # (n, head_dim)
        q = self.rotate(q.view(1, n, self.heads, hd).transpose(1, 2), rope)
        k = self.rotate(k.view(1, n, self.kv_heads, hd).transpose(1, 2), rope)
        v = v.view(1, n, self.kv_heads, hd).transpose(1, 2)
        self.keys[i][:, :, p:p + n] = k
        self.values[i][:, :, p:p + n] = v
        K, V = self.keys[i][:, :, :p + n], self.values[i][:, :, :p + n]  # (1, kv, p+n, hd)
        mask = None
        if n > 1:  # position p+j sees positions ≤ p+j
            mask = torch.ones(n, p + n, dtype=torch.bool, device=x.device).tril(p)
        o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=self.scale,
                                           enable_gqa=self.heads != self.kv_heads)
        return linear(attn.o_proj, o.transpose(1, 2).reshape(1, n, self.heads * hd))

    def rotate(self, t: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """The rotary embedding of t (1, heads, n, head_dim) at the positions of `rope`
        (cos, sin with its first half negated)."""
        cos, sin = rope
        return t * cos + t.roll(self.head_dim // 2, -1) * sin


def lean_generate(model: Any, ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, eos: set[int] | None = None,
                  banned: set[int] | None = None,
                  generator: torch.Generator | None = None, streamer: Any = None) -> Tensor:
    """ids (1, n + new): the prompt ids (1, n) continued by up to max_new_tokens tokens, greedy
    at temperature 0, else sampled (temperature, top_k, nucleus top_p); stops after a token in
    `eos`; never picks a token in `banned` (transformers' min_new_tokens bans the end token).
    streamer (transformers' interface): `put` the prompt's ids, then each token; `end` last."""
    decoder = LeanDecoder(model, ids.shape[1] + max_new_tokens)
    if streamer is not None:  # on the CPU, as transformers' generate hands them over
        streamer.put(ids.cpu())
    ban = torch.tensor(sorted(banned or ()), dtype=torch.long, device=ids.device)
    out = [ids[0]]
    step = ids
    for _ in range(max_new_tokens):
        logits = decoder(step)
        if ban.numel():
            logits = logits.index_fill(0, ban, float("-inf"))
        token = pick(logits, temperature, top_p, generator, top_k)
        out.append(token.view(1))
        if streamer is not None:
            streamer.put(token.view(1).cpu())
        if eos and int(token) in eos:
            break
        step = token.view(1, 1)
    if streamer is not None:
        streamer.end()
    return torch.cat(out)[None]


def pick(logits: Tensor, temperature: float, top_p: float,
         generator: torch.Generator | None, top_k: int = 0) -> Tensor:
    """The next token from logits (vocab,): argmax at temperature 0, else a draw from the
    softmax at that temperature restricted to the top_k most likely tokens (0: all) and then
    to the smallest set of them whose probability reaches top_p (always the most likely one),
    as transformers' top-k and top-p warpers do."""
    if temperature <= 0:  # in fp32: exact for bf16 logits; torch's bf16 argmax is 3–5× slower
        return logits.float().argmax()
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the tail beyond top_p
        drop[0] = False
        probs = probs.scatter(-1, order[drop], 0.0)
    return torch.multinomial(probs, 1, generator=generator)[0]
