// The fused glue of a lean single-token decode loop (binllm/runtime/decode.py): the small
// torch ops between a LLaMA layer's linears, each one compiled call (a pybind11 function: less
// per-call overhead than a torch.ops dispatch).
//
// rms_norm(x, weight, eps, impl) -> y: transformers' LlamaRMSNorm.forward for x (..., d)
//   fp32, bf16 or fp16 and weight (d,) of x's dtype: per row r = 1 / sqrt(mean(x²) + eps) in
//   fp32 (x read exactly in fp32, x² rounded to fp32 and summed in fp32, in sixteen partial
//   sums), t = x r rounded to x's dtype (hidden_states.to(input_dtype)), y = weight t computed
//   in fp32 and rounded once (a bf16 or fp16 product as torch computes it). Rows are split over
//   torch's intra-op threads where there are enough of them (not at batch 1).
// decode_attention(q, k, v, cos, sin, k_cache, v_cache, pos, scale, impl) -> out: one new
//   token's attention: q (.., H hd), k and v (.., KV hd), cos and sin (hd,) at position pos
//   (transformers' rotary convention: rotated t = t cos + rotate_half(t) sin, rotate_half(t) =
//   cat(-t[hd/2:], t[:hd/2]), each product and the sum rounded to the dtype as torch's ops
//   round them), caches (1, KV, max_len, hd); rotated k and v are written into the caches at
//   pos, and head h (kv head h / (H / KV)) is softmax(scale q_h K[0 .. pos]ᵀ) V[0 .. pos] in
//   fp32 (scores, softmax and the weighted sum; exp by a polynomial on AVX-512, to about an
//   ulp), rounded once to the dtype. Heads are split over threads where the cache is long;
//   with AVX-512 the heads that share a KV head are computed together (cpu_attend.cpp: each
//   cached row read once for them, the next rows asked for ahead), the portable loop and a
//   head dimension above 128 take them one by one.
// Either returns an undefined tensor (None in Python: the caller runs its torch ops) for inputs
// it does not compute: not every tensor on the CPU and of one dtype, fp32, bf16 or fp16, or a
// gradient wanted; a bad shape raises its check's error.
// impl 0: AVX-512 loops where compiled, 1: the portable loops (the same arithmetic, sums grouped
// otherwise: equal to fp32 round-off, not bit for bit).
#include "cpu_kernels.h"
#include "cpu_vec.h"

#include <ATen/core/grad_mode.h>

#include <initializer_list>

// torch's ops round a product before the sum that takes it: no fused multiply-add where the code
// writes a product and a sum (the intrinsics' explicit fmadd stays one)
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace binllm_cpu {
namespace {

bool float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// v rounded to T and read back in fp32 (how a torch op's T result enters the next op)
template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }


// sum of a[i] b[i] over [0, n) in fp32 (each product rounded), in sixteen partial sums: the
// portable loops' dot product, a loop the compiler vectorizes
template <typename A, typename B>
float dot(const A* a, const B* b, int64_t n) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int q = 0; q < 16; ++q)
      part[q] += static_cast<float>(a[i + q]) * static_cast<float>(b[i + q]);
  for (; i < n; ++i) part[i % 16] += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  float sum = 0.f;
  for (int q = 0; q < 16; ++q) sum += part[q];
  return sum;
}

// -- rms_norm --------------------------------------------------------------------------------
template <typename T>
void rms_rows(const T* x, const T* w, T* y, int64_t r0, int64_t r1, int64_t d, float eps,
              int64_t impl) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
#ifdef __AVX512F__
    if (impl == 0) {
      __m512 ss = _mm512_setzero_ps();
      for (int64_t j = 0; j < d; j += 16) {
        const __m512 v = load16(xr + j, lanes(d - j));
        ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
      }
      const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(d) + eps);
      const __m512 iv = _mm512_set1_ps(inv);
      for (int64_t j = 0; j < d; j += 16) {
        const __mmask16 m = lanes(d - j);
        const __m512 t = round16<T>(_mm512_mul_ps(load16(xr + j, m), iv));
        store16(yr + j, m, _mm512_mul_ps(load16(w + j, m), t));
      }
      continue;
    }
#endif
    const float inv = 1.f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) {
      const float t = round_to<T>(static_cast<float>(xr[j]) * inv);
      yr[j] = static_cast<T>(static_cast<float>(w[j]) * t);
    }
  }
}

template <typename T>
void rms_norm_typed(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, float eps,
                    int64_t impl) {
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  // at least 32768 values a thread (tens of microseconds): a decode step's few rows stay on one
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d));
  if (rows <= grain) {
    rms_rows(xp, wp, yp, 0, rows, d, eps, impl);
    return;
  }
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    rms_rows(xp, wp, yp, r0, r1, d, eps, impl);
  });
}

// -- decode_attention ------------------------------------------------------------------------
// one head's hd values t rotated by cos and sin (torch's op order and roundings): out[i] =
// T(T(t[i] cos[i]) + T(rotate_half(t)[i] sin[i])); written to out (T) and, if f, in fp32 to f
template <typename T>
void rotate(const T* t, const T* cs, const T* sn, int64_t hd, int64_t impl, T* out, float* f) {
  const int64_t h2 = hd / 2;
#ifdef __AVX512F__
  if (impl == 0) {
    for (int64_t i = 0; i < h2; i += 16) {
      const __mmask16 m = lanes(h2 - i);
      const __m512 a = load16(t + i, m), b = load16(t + h2 + i, m);
      const __m512 lo = round16<T>(_mm512_add_ps(
          round16<T>(_mm512_mul_ps(a, load16(cs + i, m))),
          round16<T>(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), b), load16(sn + i, m)))));
      const __m512 hi = round16<T>(_mm512_add_ps(
          round16<T>(_mm512_mul_ps(b, load16(cs + h2 + i, m))),
          round16<T>(_mm512_mul_ps(a, load16(sn + h2 + i, m)))));
      store16(out + i, m, lo);
      store16(out + h2 + i, m, hi);
      if (f) {
        _mm512_mask_storeu_ps(f + i, m, lo);
        _mm512_mask_storeu_ps(f + h2 + i, m, hi);
      }
    }
    return;
  }
#endif
  for (int64_t i = 0; i < hd; ++i) {
    const float x = static_cast<float>(t[i]);
    const float rot = i < h2 ? -static_cast<float>(t[i + h2]) : static_cast<float>(t[i - h2]);
    const float c = round_to<T>(x * static_cast<float>(cs[i]));
    const float s = round_to<T>(rot * static_cast<float>(sn[i]));
    out[i] = static_cast<T>(c + s);
    if (f) f[i] = static_cast<float>(out[i]);
  }
}

// one head's output: softmax(scale q Kᵀ) V over the n cached rows of K and V (n, hd) in fp32,
// rounded once to T; s holds the n scores
template <typename T>
void attend(const float* q, const T* K, const T* V, int64_t n, int64_t hd, float scale,
            int64_t impl, float* s, T* out) {
#ifdef __AVX512F__
  if (impl == 0) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < hd; i += 16) {
        const __mmask16 m = lanes(hd - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), load16(K + j * hd + i, m), acc);
      }
      s[j] = scale * _mm512_reduce_add_ps(acc);
      mx = std::max(mx, s[j]);
    }
    const __m512 div = _mm512_set1_ps(exp_sum(s, n, mx));
    for (int64_t i = 0; i < hd; i += 16) {  // 16 columns of the weighted sum a pass, two chains
      const __mmask16 m = lanes(hd - i);
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 2 <= n; j += 2) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), load16(V + j * hd + i, m), a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(s[j + 1]), load16(V + (j + 1) * hd + i, m), a1);
      }
      if (j < n) a0 = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), load16(V + j * hd + i, m), a0);
      store16(out + i, m, _mm512_div_ps(_mm512_add_ps(a0, a1), div));
    }
    return;
  }
#endif
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = scale * dot(q, K + j * hd, hd);
    mx = std::max(mx, s[j]);
  }
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  std::vector<float> acc(hd, 0.f);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < hd; ++i) acc[i] += s[j] * static_cast<float>(V[j * hd + i]);
  for (int64_t i = 0; i < hd; ++i) out[i] = static_cast<T>(acc[i] / sum);
}

template <typename T>
void attention_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& cs, const at::Tensor& sn, at::Tensor& kc, at::Tensor& vc,
                     int64_t pos, float scale, int64_t impl, at::Tensor& out) {
  const int64_t KV = kc.size(1), L = kc.size(2), hd = kc.size(3), H = q.numel() / hd;
  const int64_t group = H / KV;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const T *cp = cs.data_ptr<T>(), *sp = sn.data_ptr<T>();
  T *kcp = kc.data_ptr<T>(), *vcp = vc.data_ptr<T>(), *op = out.data_ptr<T>();
  for (int64_t g = 0; g < KV; ++g) {  // the new token's k (rotated) and v into the caches
    rotate(kp + g * hd, cp, sp, hd, impl, kcp + (g * L + pos) * hd, nullptr);
    std::memcpy(vcp + (g * L + pos) * hd, vp + g * hd, hd * sizeof(T));
  }
  std::vector<float> qf(H * hd);  // q rotated (rounded to T), in fp32
  std::vector<T> qt(hd);
  for (int64_t h = 0; h < H; ++h) rotate(qp + h * hd, cp, sp, hd, impl, qt.data(), &qf[h * hd]);
  const int64_t n = pos + 1;
  const auto heads = [&](int64_t h0, int64_t h1) {
    std::vector<float> s(std::min(h1 - h0, group) * n);
    for (int64_t h = h0; h < h1;) {  // the heads of [h0, h1) that share h's KV head at once
      const int64_t g = h / group, e = std::min(h1, (g + 1) * group);
      const T *Kg = kcp + g * L * hd, *Vg = vcp + g * L * hd;
      if (impl != 0 ||
          !attend_group(&qf[h * hd], e - h, Kg, Vg, n, hd, scale, s.data(), op + h * hd))
        for (int64_t i = h; i < e; ++i)
          attend(&qf[i * hd], Kg, Vg, n, hd, scale, impl, s.data(), op + i * hd);
      h = e;
    }
  };
  // at least 2^17 cached values a thread (tens of microseconds): a short cache stays on one
  const int64_t grain = std::max<int64_t>(1, 131072 / std::max<int64_t>(1, n * hd));
  if (H <= grain)
    heads(0, H);
  else
    at::parallel_for(0, H, grain, heads);
}

// whether the kernels compute these tensors: on the CPU, of one dtype (fp32, bf16 or fp16), no
// gradient wanted
bool computes(std::initializer_list<const at::Tensor*> tensors) {
  const at::ScalarType t = (*tensors.begin())->scalar_type();
  const bool grad = at::GradMode::is_enabled();
  for (const at::Tensor* a : tensors)
    if (!a->device().is_cpu() || a->scalar_type() != t || (grad && a->requires_grad()))
      return false;
  return float_dtype(t);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t impl) {
  if (!computes({&x, &weight})) return at::Tensor();
  check(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
        "rms_norm: x (..., d) and weight (d,), d = x's last dimension");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const float e = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case at::kFloat: rms_norm_typed<float>(xc, wc, y, e, impl); break;
    case at::kBFloat16: rms_norm_typed<at::BFloat16>(xc, wc, y, e, impl); break;
    default: rms_norm_typed<at::Half>(xc, wc, y, e, impl);
  }
  return y;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                            at::Tensor v_cache, int64_t pos, double scale, int64_t impl) {
  if (!computes({&q, &k, &v, &cos, &sin, &k_cache, &v_cache})) return at::Tensor();
  check(k_cache.dim() == 4 && k_cache.size(0) == 1 && k_cache.is_contiguous() &&
            v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous(),
        "decode_attention: k_cache and v_cache (1, KV, max_len, hd), contiguous, of one shape");
  const int64_t KV = k_cache.size(1), L = k_cache.size(2), hd = k_cache.size(3);
  check(hd > 0 && hd % 2 == 0 && cos.dim() == 1 && cos.size(0) == hd &&
            sin.sizes() == cos.sizes(),
        "decode_attention: cos and sin (hd,) with hd (the caches' last dimension) even");
  check(KV > 0 && k.numel() == KV * hd && v.numel() == KV * hd,
        "decode_attention: k and v (1, 1, KV * hd) for the caches' KV heads of hd values");
  check(q.dim() >= 1 && q.numel() > 0 && q.numel() == q.size(-1) && q.numel() % (KV * hd) == 0,
        "decode_attention: q (1, 1, H * hd), one token, with H a multiple of the caches' KV "
        "heads");
  TORCH_CHECK(pos >= 0 && pos < L, "binllm_cpu: decode_attention: pos ", pos,
              " outside the caches' [0, max_len) = [0, ", L, ")");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(),
                   cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  const float s = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat:
      attention_typed<float>(qc, kc, vc, cc, sc, k_cache, v_cache, pos, s, impl, out);
      break;
    case at::kBFloat16:
      attention_typed<at::BFloat16>(qc, kc, vc, cc, sc, k_cache, v_cache, pos, s, impl, out);
      break;
    default:
      attention_typed<at::Half>(qc, kc, vc, cc, sc, k_cache, v_cache, pos, s, impl, out);
  }
  return out;
}

}  // namespace binllm_cpu
