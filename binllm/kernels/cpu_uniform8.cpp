// 8-bit UniformCodes read in place from their packed bytes (a q8 embedding table as the
// output layer: binllm/packed/embedding.py's TiedHead); no kernel form, no dequantized table.
//
// uniform8_gemv(x, q, scale, zero, groupsize, impl) -> y (N, rows) f32:
//   y[n, r] = sum_j scale[r, g] (q[r, j] - zero[r, g]) x[n, j], g = j / groupsize;
//   x (N, cols) f32, bf16 or f16, q (rows * cols,) uint8, scale (rows, groups) f16 or f32,
//   zero (rows * groups,) uint8 (the packed tensors); per group the exact levels q - zero times
//   x summed in fp32, times the scale (impl 0: AVX-512, one input four rows at a time).
// uniform8_dense_bf16(q, scale, zero, groupsize, r0, out, impl): out (n, cols) bf16 = rows
//   [r0, r0 + n) of scale (q - zero), rounded as UniformCodes.dequantize().to(torch.bfloat16)
//   rounds them (the prompt path of a bf16 model's q8 output layer; row stride >= cols).
// Rows are split over torch's intra-op threads.
#include "cpu_kernels.h"

namespace binllm_cpu {
namespace {

constexpr int64_t SMALL_BATCH_U8 = 8;  // inputs per uniform8_gemv pass (its accumulators)

// the checks of uniform8_gemv's and uniform8_dense_bf16's codes; returns the groups per row
int64_t check_uniform8(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t cols, int64_t groupsize) {
  check(scale.dim() == 2 && scale.is_contiguous() &&
            (scale.scalar_type() == at::kHalf || scale.scalar_type() == at::kFloat) &&
            groupsize > 0 && scale.size(1) == (cols + groupsize - 1) / groupsize,
        "scale (rows, ceil(cols / groupsize)) f16 or f32");
  const int64_t rows = scale.size(0), ng = scale.size(1);
  check(q.scalar_type() == at::kByte && q.is_contiguous() && q.numel() == rows * cols &&
            zero.scalar_type() == at::kByte && zero.is_contiguous() && zero.numel() == rows * ng,
        "q (rows * cols,) and zero (rows * groups,) uint8");
  return ng;
}

// scale[r, g] in fp32
inline float scale_at(const void* sc, bool half, int64_t i) {
  return half ? static_cast<float>(static_cast<const c10::Half*>(sc)[i])
              : static_cast<const float*>(sc)[i];
}

#ifdef __AVX512F__
// scale[r, 0 .. ng) and zero[r, 0 .. ng) of R rows from r in fp32, into s and z (R * ng each)
template <int R>
void group_params(const void* sc, bool half, const uint8_t* ze, int64_t ng, int64_t r, float* s,
                  float* z) {
  for (int i = 0; i < R; ++i)
    for (int64_t g = 0; g < ng; g += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, ng - g)) - 1u);
      const int64_t at = (r + i) * ng + g;
      const __m512 sv = half ?
          _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(sc) + at)) :
          _mm512_maskz_loadu_ps(m, static_cast<const float*>(sc) + at);
      _mm512_mask_storeu_ps(s + i * ng + g, m, sv);
      _mm512_mask_storeu_ps(z + i * ng + g, m,
                            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, ze + at))));
    }
}

// q - zero of 16 columns of a row, in fp32 (exact: integers in [-255, 255])
inline __m512 levels16(const uint8_t* q, __mmask16 m, __m512 z) {
  return _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, q))), z);
}

inline __mmask16 mask16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFFu) : static_cast<__mmask16>((1u << left) - 1u);
}

// y[n, r] for N inputs, 16 columns a step: per group the sum of (q - zero) x, times its scale
template <int N>
void uniform8_row(const float* x, int64_t cols, const uint8_t* q, const float* s, const float* z,
                  int64_t ng, int64_t gs, float* y, int64_t rows, int64_t r) {
  __m512 acc[N];
  for (int n = 0; n < N; ++n) acc[n] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const __m512 zv = _mm512_set1_ps(z[g]);
    __m512 t[N];
    for (int n = 0; n < N; ++n) t[n] = _mm512_setzero_ps();
    const int64_t end = std::min(cols, (g + 1) * gs);
    for (int64_t j = g * gs; j < end; j += 16) {
      const __mmask16 m = mask16(end - j);
      const __m512 d = levels16(q + r * cols + j, m, zv);
      for (int n = 0; n < N; ++n)
        t[n] = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, x + n * cols + j), t[n]);
    }
    const __m512 sv = _mm512_set1_ps(s[g]);
    for (int n = 0; n < N; ++n) acc[n] = _mm512_fmadd_ps(sv, t[n], acc[n]);
  }
  for (int n = 0; n < N; ++n) y[n * rows + r] = _mm512_reduce_add_ps(acc[n]);
}

// y[0, r .. r + 4) for one input: four rows' sums side by side (their latencies overlap)
void uniform8_rows4(const float* x, int64_t cols, const uint8_t* q, const float* s,
                    const float* z, int64_t ng, int64_t gs, float* y, int64_t r) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const uint8_t *q0 = q + r * cols, *q1 = q0 + cols, *q2 = q1 + cols, *q3 = q2 + cols;
  for (int64_t g = 0; g < ng; ++g) {
    const __m512 z0 = _mm512_set1_ps(z[g]), z1 = _mm512_set1_ps(z[ng + g]),
                 z2 = _mm512_set1_ps(z[2 * ng + g]), z3 = _mm512_set1_ps(z[3 * ng + g]);
    __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
    const int64_t end = std::min(cols, (g + 1) * gs);
    for (int64_t j = g * gs; j < end; j += 16) {
      const __mmask16 m = mask16(end - j);
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + j);
      t0 = _mm512_fmadd_ps(levels16(q0 + j, m, z0), xv, t0);
      t1 = _mm512_fmadd_ps(levels16(q1 + j, m, z1), xv, t1);
      t2 = _mm512_fmadd_ps(levels16(q2 + j, m, z2), xv, t2);
      t3 = _mm512_fmadd_ps(levels16(q3 + j, m, z3), xv, t3);
    }
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(s[g]), t0, a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(s[ng + g]), t1, a1);
    a2 = _mm512_fmadd_ps(_mm512_set1_ps(s[2 * ng + g]), t2, a2);
    a3 = _mm512_fmadd_ps(_mm512_set1_ps(s[3 * ng + g]), t3, a3);
  }
  y[r] = _mm512_reduce_add_ps(a0);
  y[r + 1] = _mm512_reduce_add_ps(a1);
  y[r + 2] = _mm512_reduce_add_ps(a2);
  y[r + 3] = _mm512_reduce_add_ps(a3);
}

template <int N>
void uniform8_rows_avx512(const float* x, int64_t cols, const uint8_t* q, const void* sc,
                          bool half, const uint8_t* ze, int64_t ng, int64_t gs, float* y,
                          int64_t rows, int64_t r0, int64_t r1) {
  std::vector<float> s(4 * ng), z(4 * ng);
  int64_t r = r0;
  if (N == 1)
    for (; r + 4 <= r1; r += 4) {
      group_params<4>(sc, half, ze, ng, r, s.data(), z.data());
      uniform8_rows4(x, cols, q, s.data(), z.data(), ng, gs, y, r);
    }
  for (; r < r1; ++r) {
    group_params<1>(sc, half, ze, ng, r, s.data(), z.data());
    uniform8_row<N>(x, cols, q, s.data(), z.data(), ng, gs, y, rows, r);
  }
}
#endif

// y[n, r] = sum_j w[r, j] x[n, j] for rows [r0, r1), w = scale * (q - zero) (UniformCodes'
// weight), in fp32 as sum_g scale[r, g] * sum_{j in g} (q[r, j] - zero[r, g]) x[n, j]: q - zero
// is exact, so y is the product to fp32 round-off (x (N, cols) f32, N <= SMALL_BATCH_U8)
// (AVX-512: one input four rows at a time, more inputs one row at a time)
void uniform8_rows(const float* x, int64_t N, int64_t cols, const uint8_t* q, const void* sc,
                   bool half, const uint8_t* ze, int64_t ng, int64_t gs, float* y, int64_t rows,
                   int64_t r0, int64_t r1, int64_t impl) {
#ifdef __AVX512F__
  if (impl == 0) {
    switch (N) {
      case 1: return uniform8_rows_avx512<1>(x, cols, q, sc, half, ze, ng, gs, y, rows, r0, r1);
      case 2: return uniform8_rows_avx512<2>(x, cols, q, sc, half, ze, ng, gs, y, rows, r0, r1);
      case 3: return uniform8_rows_avx512<3>(x, cols, q, sc, half, ze, ng, gs, y, rows, r0, r1);
      case 4: return uniform8_rows_avx512<4>(x, cols, q, sc, half, ze, ng, gs, y, rows, r0, r1);
      case 5: return uniform8_rows_avx512<5>(x, cols, q, sc, half, ze, ng, gs, y, rows, r0, r1);
      case 6: return uniform8_rows_avx512<6>(x, cols, q, sc, half, ze, ng, gs, y, rows, r0, r1);
      case 7: return uniform8_rows_avx512<7>(x, cols, q, sc, half, ze, ng, gs, y, rows, r0, r1);
      default: return uniform8_rows_avx512<8>(x, cols, q, sc, half, ze, ng, gs, y, rows, r0, r1);
    }
  }
#endif
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        const float zg = static_cast<float>(ze[r * ng + g]);
        float t = 0.f;
        for (int64_t j = g * gs; j < std::min(cols, (g + 1) * gs); ++j)
          t += (static_cast<float>(q[r * cols + j]) - zg) * x[n * cols + j];
        acc += scale_at(sc, half, r * ng + g) * t;
      }
      y[n * rows + r] = acc;
    }
}

}  // namespace

at::Tensor uniform8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                         const at::Tensor& zero, int64_t groupsize, int64_t impl) {
  check(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                         x.scalar_type() == at::kHalf), "x (N, cols) f32, bf16 or f16");
  const int64_t N = x.size(0), cols = x.size(1);
  const int64_t ng = check_uniform8(q, scale, zero, cols, groupsize), rows = scale.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({N, rows}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool half = scale.scalar_type() == at::kHalf;
  for (int64_t n0 = 0; n0 < N; n0 += SMALL_BATCH_U8) {
    const int64_t n = std::min(SMALL_BATCH_U8, N - n0);
    at::parallel_for(0, rows, std::max<int64_t>(16, 262144 / std::max<int64_t>(1, cols * n)),
                     [&](int64_t a, int64_t b) {
      uniform8_rows(xp + n0 * cols, n, cols, q.data_ptr<uint8_t>(), scale.data_ptr(), half,
                    zero.data_ptr<uint8_t>(), ng, groupsize, yp + n0 * rows, rows, a, b, impl);
    });
  }
  return y;
}

// out (n, cols) bf16 = rows [r0, r0 + n) of w = scale * (q - zero) rounded to bf16 as
// UniformCodes.dequantize().to(torch.bfloat16) rounds them (out's row stride may exceed cols)
void uniform8_dense_bf16(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                         int64_t groupsize, int64_t r0, at::Tensor out, int64_t impl) {
  check(out.scalar_type() == at::kBFloat16 && out.dim() == 2 && out.stride(1) == 1 &&
            (out.size(0) <= 1 || out.stride(0) >= out.size(1)), "out (n, cols) bf16");
  const int64_t n = out.size(0), cols = out.size(1), ld = out.stride(0);
  const int64_t ng = check_uniform8(q, scale, zero, cols, groupsize);
  check(r0 >= 0 && r0 + n <= scale.size(0), "rows outside the codes");
  const uint8_t *qp = q.data_ptr<uint8_t>(), *ze = zero.data_ptr<uint8_t>();
  const void* sc = scale.data_ptr();
  const bool half = scale.scalar_type() == at::kHalf;
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, n, std::max<int64_t>(8, 65536 / std::max<int64_t>(1, cols)),
                   [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t r = r0 + i;
      for (int64_t g = 0; g < ng; ++g) {
        const float s = scale_at(sc, half, r * ng + g), z = static_cast<float>(ze[r * ng + g]);
        const int64_t end = std::min(cols, (g + 1) * groupsize);
        int64_t j = g * groupsize;
#ifdef __AVX512F__
        if (impl == 0)
          for (; j < end; j += 16) {
            const __mmask16 m = mask16(end - j);
            const __m512 w = _mm512_mul_ps(_mm512_set1_ps(s), levels16(qp + r * cols + j, m,
                                                                       _mm512_set1_ps(z)));
            _mm256_mask_storeu_epi16(o + i * ld + j, m, bf16_bits16(w));
          }
#endif
        for (; j < end; ++j)
          o[i * ld + j] = bf16_bits(s * (static_cast<float>(qp[r * cols + j]) - z));
      }
    }
  });
}

}  // namespace binllm_cpu
