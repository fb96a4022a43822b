// 8-bit UniformCodes read in place from their packed bytes (a q8 embedding table as the
// output layer: binllm/packed/embedding.py's TiedHead); no kernel form, no dequantized table.
//
// uniform8_gemv(x, q, scale, zero, groupsize, impl) -> y (N, rows) f32:
//   y[n, r] = sum_j scale[r, g] (q[r, j] - zero[r, g]) x[n, j], g = j / groupsize;
//   x (N, cols) f32, bf16 or f16, q (rows * cols,) uint8, scale (rows, groups) f16 or f32,
//   zero (rows * groups,) uint8 (the packed tensors); per group the levels times x summed in
//   fp32, times the scale (impl 0: AVX-512; one input four rows at a time, its zero points
//   folded out of the columns' loop, more inputs one row at a time).
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
inline __mmask16 mask16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFFu) : static_cast<__mmask16>((1u << left) - 1u);
}

// 16 bytes from p in fp32 (masked: the bytes of m, 0 elsewhere)
inline __m512 bytes16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 bytes16(const uint8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// scale[r, 0 .. ng) in fp32, f16 or f32 scales (masked: the groups of m, 0 elsewhere)
inline __m512 scales16(const void* sc, bool half, int64_t at, __mmask16 m) {
  return half ?
      _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(sc) + at)) :
      _mm512_maskz_loadu_ps(m, static_cast<const float*>(sc) + at);
}

// scale[r, 0 .. ng) and zero[r, 0 .. ng) of row r in fp32, into s and z (ng each)
void group_params(const void* sc, bool half, const uint8_t* ze, int64_t ng, int64_t r, float* s,
                  float* z) {
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 m = mask16(ng - g);
    _mm512_mask_storeu_ps(s + g, m, scales16(sc, half, r * ng + g, m));
    _mm512_mask_storeu_ps(z + g, m, bytes16(ze + r * ng + g, m));
  }
}

// q - zero of 16 columns of a row, in fp32 (exact: integers in [-255, 255])
inline __m512 levels16(const uint8_t* q, __mmask16 m, __m512 z) {
  return _mm512_sub_ps(bytes16(q, m), z);
}

constexpr int64_t AHEAD = 8;  // rows ahead whose bytes are prefetched while a row computes

// A prefetch of the byte `offset` past p. The address is formed as an integer: near the
// table's end it may lie past the allocation, which a prefetch never faults on, and integer
// arithmetic keeps that well defined where a pointer past the end would not be.
inline void prefetch_at(const uint8_t* p, int64_t offset) {
  const auto at = reinterpret_cast<std::uintptr_t>(p) + static_cast<std::uintptr_t>(offset);
  _mm_prefetch(reinterpret_cast<const char*>(at), _MM_HINT_T0);
}

// y[n, r] for N inputs, 16 columns a step: per group the sum of (q - zero) x, times its scale
// (the bytes of row r + AHEAD prefetched, a 64-byte line per 64 columns)
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
      if (j % 64 == 0)
        prefetch_at(q + r * cols, AHEAD * cols + j);
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

// the sums of 4 vectors a[0 .. 4), into y[0 .. 4)
inline void store_sums4(const __m512* a, float* y) {
  // 256-bit halves added (a0 a1 side by side, a2 a3), then one 128-bit block per vector, then
  // the block's four lanes: lane 4 i holds a[i]'s sum
  const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44),
                                  _mm512_shuffle_f32x4(a[0], a[1], 0xEE));
  const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44),
                                  _mm512_shuffle_f32x4(a[2], a[3], 0xEE));
  __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, 0x88),
                           _mm512_shuffle_f32x4(t0, t1, 0xDD));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));
  _mm_storeu_ps(y, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, u)));
}

// y[0, r .. r + 4) for one input, four rows side by side (their latencies overlap), the zero
// point folded out of the columns' loop:
//   sum_g s_g sum_{j in g} (q_j - z_g) x_j = sum_g s_g sum_{j in g} q_j x_j - sum_g s_g z_g X_g
// with X_g = sum_{j in g} x_j (xg, once per call): a 16-column step is a widen, a convert and
// one FMA per row, and a row's zero points are one vector product (the start of its sum).
// The bytes of the rows AHEAD below are prefetched, a 64-byte line per 64 columns.
// C > 0: every group is C full 16-column steps (groupsize 16 C, cols a multiple of it), a
// group's steps unrolled; C = 0: any groupsize, a masked step for a group's last columns.
// sbuf: room for the rows' scales in fp32 (4 ng), where they are f16.
template <int C>
void uniform8_rows4_x1(const float* x, const float* xg, int64_t cols, const uint8_t* q,
                       const void* sc, bool half, const uint8_t* ze, int64_t ng, int64_t gs,
                       float* sbuf, float* y, int64_t r) {
  constexpr int R = 4;
  __m512 a[R];
  const uint8_t* qr[R];
  const float* s = half ? sbuf : static_cast<const float*>(sc) + r * ng;
  for (int i = 0; i < R; ++i) a[i] = _mm512_setzero_ps(), qr[i] = q + (r + i) * cols;
  for (int64_t g = 0; g < ng; g += 16) {  // (the rows innermost: a stays in registers)
    const __mmask16 m = mask16(ng - g);
    const __m512 xv = _mm512_maskz_loadu_ps(m, xg + g);
    for (int i = 0; i < R; ++i) {
      const int64_t at = (r + i) * ng + g;
      const __m512 sv = scales16(sc, half, at, m);
      if (half) _mm512_mask_storeu_ps(sbuf + i * ng + g, m, sv);
      a[i] = _mm512_fnmadd_ps(_mm512_mul_ps(sv, bytes16(ze + at, m)), xv, a[i]);
    }
  }
  const auto prefetch = [&](int64_t j) {
    for (int i = 0; i < R; ++i)
      prefetch_at(qr[i], AHEAD * cols + j);
  };
  for (int64_t g = 0; g < ng; ++g) {
    __m512 t[R];
    if constexpr (C > 0) {
      constexpr int64_t every = C >= 4 ? 1 : 4 / C;  // groups per 64 columns
      const int64_t j0 = g * 16 * C;
      if (g % every == 0)
        for (int c = 0; c < C; c += 4) prefetch(j0 + 16 * c);
      const __m512 x0 = _mm512_loadu_ps(x + j0);
      for (int i = 0; i < R; ++i) t[i] = _mm512_mul_ps(bytes16(qr[i] + j0), x0);
      for (int c = 1; c < C; ++c) {
        const __m512 xv = _mm512_loadu_ps(x + j0 + 16 * c);
        for (int i = 0; i < R; ++i)
          t[i] = _mm512_fmadd_ps(bytes16(qr[i] + j0 + 16 * c), xv, t[i]);
      }
    } else {
      for (int i = 0; i < R; ++i) t[i] = _mm512_setzero_ps();
      const int64_t end = std::min(cols, (g + 1) * gs);
      int64_t j = g * gs;
      for (; j + 16 <= end; j += 16) {
        if (j % 64 == 0) prefetch(j);
        const __m512 xv = _mm512_loadu_ps(x + j);
        for (int i = 0; i < R; ++i) t[i] = _mm512_fmadd_ps(bytes16(qr[i] + j), xv, t[i]);
      }
      if (j < end) {
        if (j % 64 == 0) prefetch(j);
        const __mmask16 m = mask16(end - j);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + j);
        for (int i = 0; i < R; ++i) t[i] = _mm512_fmadd_ps(bytes16(qr[i] + j, m), xv, t[i]);
      }
    }
    for (int i = 0; i < R; ++i)
      a[i] = _mm512_fmadd_ps(_mm512_set1_ps(s[i * ng + g]), t[i], a[i]);
  }
  store_sums4(a, y + r);
}

// rows from r four at a time while four are left (r: then the first row left)
template <int C>
void uniform8_x1(const float* x, const float* xg, int64_t cols, const uint8_t* q, const void* sc,
                 bool half, const uint8_t* ze, int64_t ng, int64_t gs, float* sbuf, float* y,
                 int64_t& r, int64_t r1) {
  for (; r + 4 <= r1; r += 4)
    uniform8_rows4_x1<C>(x, xg, cols, q, sc, half, ze, ng, gs, sbuf, y, r);
}

// rows [r0, r1): one input four rows at a time (then the rest one at a time), more inputs one
// row at a time
template <int N>
void uniform8_rows_avx512(const float* x, int64_t cols, const uint8_t* q, const void* sc,
                          bool half, const uint8_t* ze, int64_t ng, int64_t gs, float* y,
                          int64_t rows, int64_t r0, int64_t r1) {
  std::vector<float> s(4 * ng), z(ng), xg(ng);
  int64_t r = r0;
  if (N == 1) {
    for (int64_t g = 0; g < ng; ++g) {  // X_g, summed in fp64 and rounded once
      double t = 0.;
      for (int64_t j = g * gs; j < std::min(cols, (g + 1) * gs); ++j) t += x[j];
      xg[g] = static_cast<float>(t);
    }
    const float* X = xg.data();
    float* sb = s.data();
    switch (cols % gs == 0 && gs % 16 == 0 ? gs / 16 : 0) {
      case 1: uniform8_x1<1>(x, X, cols, q, sc, half, ze, ng, gs, sb, y, r, r1); break;
      case 2: uniform8_x1<2>(x, X, cols, q, sc, half, ze, ng, gs, sb, y, r, r1); break;
      case 4: uniform8_x1<4>(x, X, cols, q, sc, half, ze, ng, gs, sb, y, r, r1); break;
      case 8: uniform8_x1<8>(x, X, cols, q, sc, half, ze, ng, gs, sb, y, r, r1); break;
      default: uniform8_x1<0>(x, X, cols, q, sc, half, ze, ng, gs, sb, y, r, r1);
    }
  }
  for (; r < r1; ++r) {
    group_params(sc, half, ze, ng, r, s.data(), z.data());
    uniform8_row<N>(x, cols, q, s.data(), z.data(), ng, gs, y, rows, r);
  }
}
#endif

// y[n, r] = sum_j w[r, j] x[n, j] for rows [r0, r1), w = scale * (q - zero) (UniformCodes'
// weight), in fp32 as sum_g scale[r, g] * sum_{j in g} (q[r, j] - zero[r, g]) x[n, j]: q - zero
// is exact, so y is the product to fp32 round-off (x (N, cols) f32, N <= SMALL_BATCH_U8)
// (AVX-512: one input four rows at a time as sum_g scale (sum q x - zero X_g), also fp32
// round-off; more inputs one row at a time)
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
