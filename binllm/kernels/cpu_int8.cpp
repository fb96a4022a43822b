// The int8 prefill's loops (binllm/kernels/cpu_int8.py): a prompt's column smoothing, rows
// rounded to symmetric int8, and the int8 GEMM's int32 sums scaled back.
//
// smoothing_bf16(src, c): c[j] = √(max_i |src[i, j]|) (correctly rounded; 1 for a column of
//   zeros) for src (N, K) bf16, the prompt's smoothing of its columns in one pass over x (a NaN
//   in a column leaves its c undefined: the product is not finite there either way).
// rows_int8(src, colscale, q, scale): per row i of v = src · colscale (src (n, K) bf16, row
//   stride >= K; colscale (K,) fp32 multiplies each column, empty: none), scale[i] =
//   max_j |v[i, j]| / 127 and q[i, j] = v[i, j] · 127 / max rounded to nearest even, int8
//   (0 for a row of zeros, scale 0): symmetric 8-bit rows, the operands of the int8 prefill
//   (rebuilt weight rows, and x's tokens); q = round(src * (127 / max)) in fp32, the same bits
//   as torch's ops on the same values. scale_int32(acc, sx, sw, y): y = acc · sx · sw, the
//   int8 GEMM's sums scaled back, in that order of the products, written to y fp32 or bf16
//   (rounded to nearest even, as torch's conversion).
// Rows (columns in smoothing_bf16) are split over torch's intra-op threads; each writes its own.
#include "cpu_kernels.h"

namespace binllm_cpu {

void smoothing_bf16(const at::Tensor& src, at::Tensor c) {
  check(src.dim() == 2 && src.scalar_type() == at::kBFloat16 && src.stride(1) == 1,
        "src (N, K) bf16 with unit column stride");
  const int64_t N = src.size(0), K = src.size(1), ld = src.stride(0);
  check(c.scalar_type() == at::kFloat && c.is_contiguous() && c.numel() == K, "c (K,) fp32");
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
  float* cp = c.data_ptr<float>();
  const int64_t blocks = (K + 15) / 16;  // a thread owns whole 16-column blocks
  at::parallel_for(0, blocks, std::max<int64_t>(1, blocks / 8), [&](int64_t a, int64_t b) {
    const int64_t j0 = a * 16, j1 = std::min(K, b * 16);
    std::fill(cp + j0, cp + j1, 0.f);
    for (int64_t i = 0; i < N; ++i) {  // row by row: each row's slice is contiguous
      const uint16_t* r = sp + i * ld;
      int64_t j = j0;
#ifdef __AVX512F__
      for (; j + 16 <= j1; j += 16) {
        const __m512 v = _mm512_abs_ps(bf16_float16(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(r + j))));
        _mm512_storeu_ps(cp + j, _mm512_max_ps(_mm512_loadu_ps(cp + j), v));
      }
#endif
      for (; j < j1; ++j) cp[j] = std::max(cp[j], std::fabs(bf16_float(r[j])));
    }
    for (int64_t j = j0; j < j1; ++j) cp[j] = cp[j] > 0.f ? std::sqrt(cp[j]) : 1.f;
  });
}

void rows_int8(const at::Tensor& src, const at::Tensor& colscale, at::Tensor q,
               at::Tensor scale) {
  check(src.dim() == 2 && src.scalar_type() == at::kBFloat16 && src.stride(1) == 1,
        "src (n, K) bf16 with unit column stride");
  const int64_t n = src.size(0), K = src.size(1), ld = src.stride(0);
  check(q.scalar_type() == at::kChar && q.dim() == 2 && q.size(0) == n && q.size(1) == K &&
            q.stride(1) == 1, "q (n, K) int8 with unit column stride");
  check(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n,
        "scale (n,) fp32");
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
  int8_t* qp = q.data_ptr<int8_t>();
  const int64_t lq = q.stride(0);
  float* scp = scale.data_ptr<float>();
  check(colscale.numel() == 0 || (colscale.scalar_type() == at::kFloat &&
                                  colscale.is_contiguous() && colscale.numel() == K),
        "colscale (K,) fp32 or empty");
  const float* cs = colscale.numel() ? colscale.data_ptr<float>() : nullptr;
  auto value = [cs](const uint16_t* r, int64_t j) {  // v[i, j] of row r
    return cs ? bf16_float(r[j]) * cs[j] : bf16_float(r[j]);
  };
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)),
                   [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const uint16_t* r = sp + i * ld;
      int8_t* o = qp + i * lq;
      int64_t j = 0;
      float m = 0.f;
#ifdef __AVX512F__
      __m512 mv = _mm512_setzero_ps();
      for (; j + 16 <= K; j += 16) {
        __m512 v = bf16_float16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + j)));
        if (cs) v = _mm512_mul_ps(v, _mm512_loadu_ps(cs + j));
        mv = _mm512_max_ps(mv, _mm512_abs_ps(v));
      }
      m = _mm512_reduce_max_ps(mv);
#endif
      for (; j < K; ++j) m = std::max(m, std::fabs(value(r, j)));
      scp[i] = m / 127.f;
      const float inv = m > 0.f ? 127.f / m : 0.f;
      if (!std::isfinite(inv)) {  // |values| below ~4e-37: the row rounds to zeros
        std::memset(o, 0, K);
        continue;
      }
      j = 0;
#ifdef __AVX512F__
      const __m512 iv = _mm512_set1_ps(inv);
      for (; j + 16 <= K; j += 16) {  // round to nearest even (MXCSR's default), saturated
        __m512 v = bf16_float16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + j)));
        if (cs) v = _mm512_mul_ps(v, _mm512_loadu_ps(cs + j));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, iv))));
      }
#endif
      for (; j < K; ++j)
        o[j] = static_cast<int8_t>(std::nearbyint(value(r, j) * inv));
    }
  });
}

// y[i, j] = acc[i, j] · sx[i] · sw[j] in fp32, in that order: the int8 GEMM's int32 sums scaled
// back, acc (N, n) int32 contiguous, y (N, n) fp32 or bf16 with unit column stride (a column
// slice; bf16 rounded to nearest even, as torch converts).
void scale_int32(const at::Tensor& acc, const at::Tensor& sx, const at::Tensor& sw,
                 at::Tensor y) {
  check(acc.dim() == 2 && acc.scalar_type() == at::kInt && acc.is_contiguous(),
        "acc (N, n) int32 contiguous");
  const int64_t N = acc.size(0), n = acc.size(1), ld = y.stride(0);
  check(sx.scalar_type() == at::kFloat && sx.is_contiguous() && sx.numel() == N &&
            sw.scalar_type() == at::kFloat && sw.is_contiguous() && sw.numel() == n,
        "sx (N,), sw (n,) fp32");
  const bool bf16 = y.scalar_type() == at::kBFloat16;
  check((bf16 || y.scalar_type() == at::kFloat) && y.dim() == 2 && y.size(0) == N &&
            y.size(1) == n && y.stride(1) == 1,
        "y (N, n) fp32 or bf16 with unit column stride");
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float *xp = sx.data_ptr<float>(), *wp = sw.data_ptr<float>();
  float* yf = bf16 ? nullptr : y.data_ptr<float>();
  at::BFloat16* yb = bf16 ? y.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n)),
                   [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int32_t* ai = ap + i * n;
      const float s = xp[i];
      if (bf16) {
        at::BFloat16* yi = yb + i * ld;
        for (int64_t j = 0; j < n; ++j)
          yi[j] = at::BFloat16(static_cast<float>(ai[j]) * s * wp[j]);
      } else {
        float* yi = yf + i * ld;
        for (int64_t j = 0; j < n; ++j) yi[j] = static_cast<float>(ai[j]) * s * wp[j];
      }
    }
  });
}

}  // namespace binllm_cpu
