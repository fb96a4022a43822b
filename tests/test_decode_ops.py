"""The lean decode loop's fused glue (binllm.kernels.decode_ops): rms_norm against transformers'
LlamaRMSNorm formula in torch, decode_attention against torch's rotary ops, cache writes and
scaled_dot_product_attention, the caches it writes, dense_gemv against the exact product, what
each refuses and what it declines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_cpu_kernels import needs_extension

from binllm.kernels import cpu, cpu_build, decode_attention, decode_ops, dense_gemv, rms_norm

IMPLS = list(cpu.IMPLS)


def rms_oracle(x, weight, eps):
    """LlamaRMSNorm.forward written in torch."""
    h = x.float()
    variance = h.pow(2).mean(-1, keepdim=True)
    return weight * (h * torch.rsqrt(variance + eps)).to(x.dtype)


def ulps(a, b):
    """The distance of two bf16 or fp16 tensors in units in the last place (same signs)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max().item()


@needs_extension
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_equals_llama_rms_norm(dtype, impl):
    """Rows 1 to 5 (and 200: the threads' path), d 64, 576 and 100 (a partial vector): fp32 to
    round-off; bf16 and fp16 mostly equal, the normalized x within one ulp (mean's sum is
    grouped otherwise, so x · rsqrt may round the other way), weight · it within two."""
    g = torch.Generator().manual_seed(0)
    for shape in ((1, 1, 64), (3, 576), (5, 100), (2, 2, 576), (1, 100), (200, 576)):
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
        for weight, most in ((torch.ones_like(w), 1), (w, 2)):
            y = rms_norm(x, weight, 1e-5, impl)
            ref = rms_oracle(x, weight, 1e-5)
            assert y.shape == x.shape and y.dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
            else:
                assert ulps(y, ref) <= most, (shape, ulps(y, ref))
                assert (y != ref).float().mean() < 0.01


def rotate_half(t):
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def attention_oracle(q, k, v, cos, sin, k_cache, v_cache, pos, scale):
    """transformers' rotary embedding, the cache write and SDPA with GQA, in torch ops."""
    KV, hd = k_cache.shape[1], k_cache.shape[3]
    H = q.shape[-1] // hd
    qh = q.view(1, 1, H, hd).transpose(1, 2)
    kh = k.view(1, 1, KV, hd).transpose(1, 2)
    vh = v.view(1, 1, KV, hd).transpose(1, 2)
    qr = (qh * cos) + (rotate_half(qh) * sin)
    kr = (kh * cos) + (rotate_half(kh) * sin)
    k_cache[:, :, pos] = kr[:, :, 0]
    v_cache[:, :, pos] = vh[:, :, 0]
    o = F.scaled_dot_product_attention(qr, k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1],
                                       scale=scale, enable_gqa=True)
    return o.transpose(1, 2).reshape(1, 1, H * hd)


def attention_inputs(H, KV, hd, max_len, pos, dtype, seed=0):
    """q, k, v, cos, sin at pos (transformers' duplicated halves) and random caches."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, H * hd, generator=g).to(dtype)
    k = torch.randn(1, 1, KV * hd, generator=g).to(dtype)
    v = torch.randn(1, 1, KV * hd, generator=g).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    angle = torch.cat([pos * inv_freq] * 2)
    caches = [torch.randn(1, KV, max_len, hd, generator=g).to(dtype) for _ in range(2)]
    return q, k, v, angle.cos().to(dtype), angle.sin().to(dtype), *caches


@needs_extension
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,KV,hd,pos", [(9, 3, 64, 0), (9, 3, 64, 37), (4, 4, 16, 37),
                                          (9, 3, 64, 1500), (8, 2, 64, 33), (16, 2, 64, 47),
                                          (6, 2, 72, 30), (4, 2, 40, 17), (8, 2, 80, 21),
                                          (14, 2, 128, 40), (2, 1, 200, 19)])
def test_decode_attention_equals_rotary_cache_write_and_sdpa(H, KV, hd, pos, dtype, impl):
    """The output to fp32 round-off (bf16, fp16: 2% of its largest entry), the caches' row pos
    the rotated k and v bit for bit, every other row unchanged; pos 1500: the threads' path.
    Heads a KV head 3, 4, 8 at hd 64 (one pass, two); hd 72 and 40: a partial chunk of 16
    values, chunks past hd; hd 80 and 128 with 4 and 7 heads a KV head: passes of two heads;
    hd 200: one head at a time (the grouped loop stops at 128)."""
    q, k, v, cos, sin, kc, vc = attention_inputs(H, KV, hd, pos + 5, pos, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    scale = hd ** -0.5
    ref = attention_oracle(q, k, v, cos, sin, kc_ref, vc_ref, pos, scale)
    before = kc.clone(), vc.clone()
    out = decode_attention(q, k, v, cos, sin, kc, vc, pos, scale, impl)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    for new, old in zip((kc, vc), before):
        rest = torch.ones(new.shape[2], dtype=torch.bool)
        rest[pos] = False
        assert torch.equal(new[:, :, rest], old[:, :, rest])
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    else:
        assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    if pos == 0:  # one cached row: the softmax is 1, each head its kv head's v
        assert torch.equal(out.view(KV, H // KV, hd), v.view(KV, 1, hd).expand(-1, H // KV, -1))


@needs_extension
def test_bad_shapes_are_refused_with_a_clear_error():
    q, k, v, cos, sin, kc, vc = attention_inputs(9, 3, 64, 8, 2, torch.float32)
    args = dict(q=q, k=k, v=v, cos=cos, sin=sin, k_cache=kc, v_cache=vc, pos=2, scale=0.125)
    for change, message in (
            (dict(q=torch.randn(1, 1, 5 * 64)), "H a multiple of the caches' KV heads"),
            (dict(q=torch.randn(1, 2, 9 * 64)), "one token"),
            (dict(pos=8), r"pos 8 outside the caches' \[0, max_len\) = \[0, 8\)"),
            (dict(pos=-1), r"pos -1 outside the caches' \[0, max_len\)"),
            (dict(cos=cos[:32], sin=sin[:32]), r"cos and sin \(hd,\)"),
            (dict(k=k[..., :64]), r"k and v \(1, 1, KV \* hd\)"),
            (dict(k_cache=kc.transpose(2, 3)), "k_cache and v_cache"),
            (dict(v_cache=vc[:, :2]), "k_cache and v_cache")):
        with pytest.raises(RuntimeError, match=message):
            decode_attention(**{**args, **change})
    with pytest.raises(RuntimeError, match=r"weight \(d,\)"):
        rms_norm(torch.randn(2, 64), torch.ones(63), 1e-6)


@needs_extension
def test_inputs_the_kernels_do_not_compute_return_none():
    """fp64, mixed dtypes and a wanted gradient: None (the caller's torch ops compute them)."""
    x, w = torch.randn(2, 64), torch.ones(64)
    assert rms_norm(x.double(), w.double(), 1e-6) is None
    assert rms_norm(x.bfloat16(), w, 1e-6) is None
    assert rms_norm(x, w.requires_grad_(), 1e-6) is None
    with torch.no_grad():
        assert rms_norm(x, w, 1e-6) is not None
    args = list(attention_inputs(4, 4, 16, 4, 1, torch.float32))
    assert decode_attention(*[a.double() for a in args], 1, 0.25) is None
    assert decode_attention(args[0].bfloat16(), *args[1:], 1, 0.25) is None
    assert decode_attention(args[0].requires_grad_(), *args[1:], 1, 0.25) is None


def test_without_the_extension_both_return_none(monkeypatch):
    monkeypatch.setattr(decode_ops, "extension", lambda: cpu_build.ExtensionStatus(False, "no"))
    assert rms_norm(torch.randn(2, 64), torch.ones(64), 1e-6) is None
    assert decode_attention(*attention_inputs(4, 4, 16, 4, 1, torch.float32), 1, 0.25) is None
    assert decode_ops.decode_layers([], torch.ones(4, 16), torch.ones(4, 16), 0.25) is None
    assert dense_gemv(torch.ones(1, 8).bfloat16(), torch.ones(3, 8).bfloat16()) is None


needs_avx512 = pytest.mark.skipif(not cpu_build.extension().avx512,
                                  reason="dense_gemv computes only where AVX-512 is compiled")


@needs_avx512
@pytest.mark.parametrize("rows, cols", [(1, 1), (37, 50), (200, 576), (1001, 33), (130, 64)])
def test_dense_gemv_is_the_exact_product_rounded_once_to_bf16(rows, cols):
    """Against x Wᵀ + b in fp64: within bf16's rounding of the exact value (2⁻⁸ relative) plus
    the fp32 sums' error bound (cols · 2⁻²⁴ · Σ|w x|), and equal to the exact value rounded to
    bf16 almost everywhere. Partial vectors (33, 50 columns), row counts that are not a multiple
    of the two rows a step or the sixteen rounded together, one column; with and without bias."""
    g = torch.Generator().manual_seed(rows)
    W = torch.randn(rows, cols, generator=g).bfloat16()
    x = torch.randn(1, 1, cols, generator=g).bfloat16()
    for bias in (None, torch.randn(rows, generator=g).bfloat16()):
        with torch.no_grad():
            y = dense_gemv(x, W, bias)
        exact = x.double() @ W.double().T + (0 if bias is None else bias.double())
        bound = exact.abs() * 2**-8 + (x.double().abs() @ W.double().abs().T) * (cols + 2) * 2**-24
        assert y.shape == (1, 1, rows) and y.dtype == torch.bfloat16
        assert ((y.double() - exact).abs() <= bound).all()
        assert (y == exact.bfloat16()).float().mean() >= 0.97


@needs_avx512
def test_dense_gemv_declines_what_it_does_not_compute_and_refuses_bad_shapes():
    """fp32, two tokens, a transposed weight, an fp32 bias, a wanted gradient or another impl:
    None (torch's linear computes them); x or a bias that does not fit W: a clear error."""
    W, x = torch.randn(16, 16).bfloat16(), torch.randn(1, 16).bfloat16()
    assert dense_gemv(x, W) is not None
    assert dense_gemv(x.float(), W.float()) is None
    assert dense_gemv(torch.randn(2, 16).bfloat16(), W) is None
    assert dense_gemv(x, W.t()) is None
    assert dense_gemv(x, W, torch.zeros(16)) is None
    assert dense_gemv(x, W, impl="portable") is None
    assert dense_gemv(x, W.requires_grad_()) is None
    with pytest.raises(RuntimeError, match="x's last dimension is not the weight's columns"):
        dense_gemv(torch.randn(1, 15).bfloat16(), W.detach())
    with pytest.raises(RuntimeError, match=r"the bias is not \(rows,\)"):
        dense_gemv(x, W.detach(), torch.zeros(15).bfloat16())


@needs_extension
def test_decode_layers_refuse_bad_layers_and_tokens_with_a_clear_error():
    """One layer of dense linears (d 32, 2 heads of 16, 1 KV head): a malformed layer tuple,
    caches that do not match cos/sin, a prompt of two tokens and a position past max_len."""
    d, hd, L = 32, 16, 4
    cos, sin = torch.ones(L, hd), torch.zeros(L, hd)
    kc, vc = torch.zeros(1, 1, L, hd), torch.zeros(1, 1, L, hd)
    shapes = ((d, d), (hd, d), (hd, d), (d, d), (64, d), (64, d), (d, 64))
    linears = tuple((None, torch.randn(s), None) for s in shapes)
    layer = (torch.ones(d), 1e-6, torch.ones(d), 1e-6, linears, kc, vc)
    with pytest.raises(RuntimeError, match="seven linears"):
        decode_ops.decode_layers([(*layer[:4], linears[:6], kc, vc)], cos, sin, 0.25)
    with pytest.raises(RuntimeError, match=r"caches \(1, KV, max_len, hd\)"):
        decode_ops.decode_layers([(*layer[:5], kc[:, :, :3], vc)], cos, sin, 0.25)
    layers = decode_ops.decode_layers([layer], cos, sin, 0.25)
    with torch.no_grad():
        assert layers(torch.randn(1, 1, d), 3).shape == (1, 1, d)
        with pytest.raises(RuntimeError, match="one token"):
            layers(torch.randn(1, 2, d), 0)
        with pytest.raises(RuntimeError, match=r"pos 4 outside \[0, max_len\) = \[0, 4\)"):
            layers(torch.randn(1, 1, d), 4)
