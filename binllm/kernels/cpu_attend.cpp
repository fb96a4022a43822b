// One new token's attention for the heads that share one cached K and V (a KV group), with
// AVX-512 (cpu_decode.cpp's decode_attention calls it; its portable loop computes one head):
//
// attend_group(q, G, K, V, n, hd, scale, s, out) -> bool: for each head h < G,
//   out[h] = softmax(scale q[h] K[0 .. n)ᵀ) V[0 .. n), in fp32, rounded once to T;
//   q (G, hd) fp32, K and V (n, hd) of T, s (G, n) scratch for the scores, out (G, hd) of T,
//   in passes of up to four heads (hd <= 64) or two (hd <= 128).
//   False (nothing done) where it is not compiled (no AVX-512) or hd exceeds 128.
// A cached row is read once for the heads of a pass (all G heads where G is at most four, or
// two at hd above 64): its hd values are widened to fp32 once, and each head's product is a
// chain of fused multiply-adds over the row's 16-value chunks. Sixteen
// rows' products are summed across their lanes together (a transpose of pairwise adds, 15
// shuffle-add steps for 16 scores, where one lane sum a row would take 4 steps each). The
// weighted sum of V keeps one fp32 sum per head and chunk, each row read once. Exact in the
// sense of fp32 round-off: the sums group differently from the portable loop's.
#include "cpu_vec.h"

namespace binllm_cpu {

#ifdef __AVX512F__
namespace {

// a hint to fetch the cached row AHEAD rows after row j: one head group's rows are read once
// each, from memory at a long context (30 layers' caches do not stay in cache), and the
// hardware prefetcher alone leaves the loop waiting on them (the rows of 30 SmolLM2 layers at
// 4,000 positions: 13.9 ms without the hint, 3.2 ms with it). The address is formed as an
// integer: near the end it lies past the cache, where a hint is harmless.
constexpr int64_t AHEAD = 32;
template <typename T>
inline void ask_ahead(const T* rows, int64_t j, int64_t hd) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(rows) + (j + AHEAD) * hd * sizeof(T);
  const uintptr_t bytes = hd * sizeof(T);
  for (uintptr_t b = 0; b < bytes; b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(at + b), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(at + bytes - 1), _MM_HINT_T0);  // a row's last line
}

// the 16 lane sums of v[0 .. 16): lane r of the result is the sum of v[r]'s lanes
inline __m512 lane_sums(const __m512* v) {
  __m512 u[8], w[4], z[2];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3)
    u[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                         _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k)  // per 128-bit lane: the lane's sums of v[4k .. 4k + 4)
    w[k] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0xEE));
  for (int k = 0; k < 2; ++k)  // 128-bit lanes 0 + 1 and 2 + 3 of w[2k], then of w[2k + 1]
    z[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                       _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

// NH heads of a group, C chunks of 16 values a row (hd <= 16 C; chunks past hd are zero):
// every loop over heads and chunks has a bound known here, so the compiler keeps the query,
// the row's chunks and the weighted sums in registers (the 16 rows' products go to memory)
template <typename T, int C, int NH>
void heads_pass(const float* q, const T* K, const T* V, int64_t n, int64_t hd, float scale,
                float* s, T* out) {
  __mmask16 cm[C];  // chunks past hd: no lanes, and no address formed for them
  for (int c = 0; c < C; ++c) cm[c] = hd > 16 * c ? lanes(hd - 16 * c) : 0;
  const __m512 zero = _mm512_setzero_ps();
  __m512 qv[NH][C];
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < C; ++c)
      qv[h][c] = cm[c] ? _mm512_maskz_loadu_ps(cm[c], q + h * hd + 16 * c) : zero;
  float mx[NH];
  for (int h = 0; h < NH; ++h) mx[h] = -INFINITY;
  __m512 prod[NH][16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {  // scores of 16 rows at a time
    const int rows = static_cast<int>(std::min<int64_t>(16, n - j0));
    for (int r = 0; r < 16; ++r) {
      if (r >= rows) {
        for (int h = 0; h < NH; ++h) prod[h][r] = _mm512_setzero_ps();
        continue;
      }
      ask_ahead(K, j0 + r, hd);
      __m512 kv[C];
      for (int c = 0; c < C; ++c)
        kv[c] = cm[c] ? load16(K + (j0 + r) * hd + 16 * c, cm[c]) : zero;
      for (int h = 0; h < NH; ++h) {
        __m512 a = _mm512_mul_ps(qv[h][0], kv[0]);
        for (int c = 1; c < C; ++c) a = _mm512_fmadd_ps(qv[h][c], kv[c], a);
        prod[h][r] = a;
      }
    }
    const __mmask16 m = lanes(rows);
    for (int h = 0; h < NH; ++h) {
      const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(scale), lane_sums(prod[h]));
      _mm512_mask_storeu_ps(s + h * n + j0, m, sc);
      mx[h] = std::max(mx[h], _mm512_mask_reduce_max_ps(m, sc));
    }
  }
  float total[NH];
  for (int h = 0; h < NH; ++h) total[h] = exp_sum(s + h * n, n, mx[h]);
  __m512 acc[NH][C];
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {  // the weighted sum of V, each row read once
    ask_ahead(V, j, hd);
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = cm[c] ? load16(V + j * hd + 16 * c, cm[c]) : zero;
    for (int h = 0; h < NH; ++h) {
      const __m512 w = _mm512_set1_ps(s[h * n + j]);
      for (int c = 0; c < C; ++c) acc[h][c] = _mm512_fmadd_ps(w, vv[c], acc[h][c]);
    }
  }
  for (int h = 0; h < NH; ++h) {
    const __m512 div = _mm512_set1_ps(total[h]);
    for (int c = 0; c < C; ++c)
      if (cm[c]) store16(out + h * hd + 16 * c, cm[c], _mm512_div_ps(acc[h][c], div));
  }
}

// heads [0, G) in passes of up to HB heads (HB: their sums and a row's chunks fit the registers)
template <typename T, int C, int HB>
void group_passes(const float* q, int64_t G, const T* K, const T* V, int64_t n, int64_t hd,
                  float scale, float* s, T* out) {
  static_assert(HB >= 1 && HB <= 4, "one to four heads a pass");
  for (int64_t h = 0; h < G;) {
    const int64_t nh = std::min<int64_t>(HB, G - h);
    const float* qh = q + h * hd;
    float* sh = s + h * n;
    T* oh = out + h * hd;
    switch (nh) {
      case 1: heads_pass<T, C, 1>(qh, K, V, n, hd, scale, sh, oh); break;
      case 2: heads_pass<T, C, (HB >= 2 ? 2 : 1)>(qh, K, V, n, hd, scale, sh, oh); break;
      case 3: heads_pass<T, C, (HB >= 3 ? 3 : 1)>(qh, K, V, n, hd, scale, sh, oh); break;
      default: heads_pass<T, C, HB>(qh, K, V, n, hd, scale, sh, oh);
    }
    h += nh;
  }
}

}  // namespace
#endif

template <typename T>
bool attend_group(const float* q, int64_t G, const T* K, const T* V, int64_t n, int64_t hd,
                  float scale, float* s, T* out) {
#ifdef __AVX512F__
  if (hd <= 64) {  // heads a pass: their sums and a row's chunks fit the registers
    group_passes<T, 4, 4>(q, G, K, V, n, hd, scale, s, out);
    return true;
  }
  if (hd <= 128) {
    group_passes<T, 8, 2>(q, G, K, V, n, hd, scale, s, out);
    return true;
  }
  return false;
#else
  return false;
#endif
}

template bool attend_group(const float*, int64_t, const float*, const float*, int64_t, int64_t,
                           float, float*, float*);
template bool attend_group(const float*, int64_t, const at::BFloat16*, const at::BFloat16*,
                           int64_t, int64_t, float, float*, at::BFloat16*);
template bool attend_group(const float*, int64_t, const at::Half*, const at::Half*, int64_t,
                           int64_t, float, float*, at::Half*);

}  // namespace binllm_cpu
