// The 16-lane helpers the decode loop's kernels share (cpu_decode.cpp, cpu_attend.cpp): a tail's
// lane mask, loads of 16 fp32 / bf16 / fp16 values in fp32 (exact), stores and roundings to
// those types (nearest even, as c10 rounds), exp of 16 values and a softmax's exponentials.
#pragma once

#include "cpu_kernels.h"

#ifdef __AVX512F__
namespace binllm_cpu {

inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFFu) : static_cast<__mmask16>((1u << left) - 1u);
}

// 16 values of T from p (lanes m, others 0) in fp32, exactly
template <typename T> __m512 load16(const T* p, __mmask16 m);
template <> inline __m512 load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
template <> inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  return bf16_float16(_mm256_maskz_loadu_epi16(m, p));
}
template <> inline __m512 load16(const at::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// v rounded to T (nearest even, as c10's conversions round) into p's lanes m
template <typename T> void store16(T* p, __mmask16 m, __m512 v);
template <> inline void store16(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
template <> inline void store16(at::BFloat16* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, bf16_bits16(v));
}
template <> inline void store16(at::Half* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// v rounded to T, in fp32
template <typename T> __m512 round16(__m512 v);
template <> inline __m512 round16<float>(__m512 v) { return v; }
template <> inline __m512 round16<at::BFloat16>(__m512 v) {
  return bf16_float16(bf16_bits16(v));
}
template <> inline __m512 round16<at::Half>(__m512 v) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// exp(x) of 16 values (to about one ulp, as std::exp): 2^k exp(r) for k = round(x / ln 2),
// r = x - k ln 2 (ln 2 in two parts, so r is exact), exp(r) by Cephes expf's polynomial
// (|r| <= ln 2 / 2); x below -104 gives 0, as exp rounds it, and a NaN stays NaN
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, k);
}

// s[0 .. n) = exp(s - mx) in place (a softmax's numerators) and their sum, added lane by lane
// in 16 partial sums
inline float exp_sum(float* s, int64_t n, float mx) {
  const __m512 top = _mm512_set1_ps(mx);
  __m512 t = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), top));
    _mm512_mask_storeu_ps(s + j, m, e);
    t = _mm512_mask_add_ps(t, m, t, e);
  }
  return _mm512_reduce_add_ps(t);
}

}  // namespace binllm_cpu
#endif
