// PB-LLM's salient weights: the SparsePart of a kernel form, a CSR product added into y.
//
// sparse(x, rowptr, col, q, scale, zero, sub, groupsize, y, impl): col uint16 or int32
//   y[n, r] += sum_k (scale[r] * (q_k - zero[r]) - sub[r, col_k / groupsize]) * x[n, col_k]
//   (AVX-512: 16 entries at once, x and sub gathered; col / groupsize by a shift, or in fp32
//   as floor((col + 0.5) / groupsize), exact for cols < 2^22)
// Rows are split over torch's intra-op threads.
#include "cpu_kernels.h"

namespace binllm_cpu {
namespace {

#ifdef __AVX512F__
// 16 entries of a row at once: x and sub gathered, the value sc (q - ze) - sub in registers
inline __m512i cols16(const int32_t* c, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, c); }
inline __m512i cols16(const uint16_t* c, __mmask16 m) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, c));
}

template <typename I>
void sparse_rows_avx512(const float* xp, int64_t cols, const int64_t* rp, const I* cp,
                        const uint8_t* qp, const float* sc, const float* ze, const float* sb,
                        int64_t ng, int64_t groupsize, int shift, int64_t N, int64_t rows,
                        float* out, int64_t r0, int64_t r1) {
  const __m512 inv = _mm512_set1_ps(1.f / static_cast<float>(groupsize));
  const __m512 half = _mm512_set1_ps(0.5f);
  for (int64_t r = r0; r < r1; ++r) {
    const __m512 s = _mm512_set1_ps(sc[r]), z = _mm512_set1_ps(ze[r]);
    __m512 acc[8];
    for (int64_t n = 0; n < N; ++n) acc[n] = _mm512_setzero_ps();
    for (int64_t k = rp[r]; k < rp[r + 1]; k += 16) {
      const __mmask16 m = static_cast<__mmask16>(
          (1u << std::min<int64_t>(16, rp[r + 1] - k)) - 1u);
      const __m512i c = cols16(cp + k, m);
      const __m512i g = shift >= 0 ? _mm512_srli_epi32(c, static_cast<unsigned>(shift)) :
          _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(c), half), inv));
      const __m512 sub = ng == 1 ? _mm512_set1_ps(sb[r]) :  // one group: no gather
          _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, g, sb + r * ng, 4);
      const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, qp + k)));
      const __m512 val = _mm512_fmsub_ps(s, _mm512_sub_ps(q, z), sub);
      for (int64_t n = 0; n < N; ++n)
        acc[n] = _mm512_fmadd_ps(
            val, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, c, xp + n * cols, 4), acc[n]);
    }
    for (int64_t n = 0; n < N; ++n) out[n * rows + r] += _mm512_reduce_add_ps(acc[n]);
  }
}
#endif

// y (N, rows) += the SparsePart's product with x (N, cols), both fp32 contiguous (checked)
template <typename I>
void sparse_typed(const float* xp, int64_t N, int64_t cols, const at::Tensor& rowptr,
                  const I* cp, const at::Tensor& q, const at::Tensor& scale,
                  const at::Tensor& zero, const at::Tensor& sub, int64_t groupsize, float* out,
                  int64_t impl) {
  const int64_t rows = rowptr.size(0) - 1, ng = sub.size(1);
  const float *sc = scale.data_ptr<float>(), *ze = zero.data_ptr<float>(),
              *sb = sub.data_ptr<float>();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int64_t nnz = rp[rows];  // at least ~64k entries per task: small layers stay serial
  const int64_t grain = std::max<int64_t>(64, rows * 65536 / std::max<int64_t>(1, nnz * N));
  int shift = -1;  // groupsize = 2^shift: the group by a shift, else by a float division
  for (int b = 0; b < 31; ++b)
    if (groupsize == (int64_t{1} << b)) shift = b;
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
#ifdef __AVX512F__
    if (impl == 0 && cols < (int64_t{1} << 22) && N <= 8) {
      sparse_rows_avx512(xp, cols, rp, cp, qp, sc, ze, sb, ng, groupsize, shift, N, rows, out,
                         r0, r1);
      return;
    }
#endif
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t n = 0; n < N; ++n) {
        const float* xr = xp + n * cols;
        float acc = 0.f;
        for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
          const int64_t c = cp[k];
          acc += (sc[r] * (static_cast<float>(qp[k]) - ze[r]) - sb[r * ng + c / groupsize]) * xr[c];
        }
        out[n * rows + r] += acc;
      }
  });
}

}  // namespace

// the checks of a SparsePart's tensors (sparse's arguments after x, before y)
void check_sparse(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& q,
                  const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& sub,
                  int64_t groupsize) {
  check(col.is_contiguous() && (col.scalar_type() == at::kInt || col.scalar_type() == at::kUInt16),
        "col (n,) int32 or uint16");
  check(rowptr.scalar_type() == at::kLong && q.scalar_type() == at::kByte &&
            sub.is_contiguous() && sub.dim() == 2 && groupsize > 0, "sparse part dtypes");
}

void sparse_rows(const float* x, int64_t N, int64_t cols, const at::Tensor& rowptr,
                 const at::Tensor& col, const at::Tensor& q, const at::Tensor& scale,
                 const at::Tensor& zero, const at::Tensor& sub, int64_t groupsize, float* y,
                 int64_t impl) {
  if (col.scalar_type() == at::kInt)
    sparse_typed(x, N, cols, rowptr, col.data_ptr<int32_t>(), q, scale, zero, sub, groupsize, y,
                 impl);
  else
    sparse_typed(x, N, cols, rowptr, static_cast<const uint16_t*>(col.data_ptr()), q, scale, zero,
                 sub, groupsize, y, impl);
}

void sparse(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
            const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
            const at::Tensor& sub, int64_t groupsize, at::Tensor y, int64_t impl) {
  check(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x (N, cols) f32");
  check_sparse(rowptr, col, q, scale, zero, sub, groupsize);
  check(y.scalar_type() == at::kFloat && y.dim() == 2 && y.size(0) == x.size(0) &&
            y.size(1) == rowptr.size(0) - 1 && y.is_contiguous(), "y (N, rows) f32");
  sparse_rows(x.data_ptr<float>(), x.size(0), x.size(1), rowptr, col, q, scale, zero, sub,
              groupsize, y.data_ptr<float>(), impl);
}

}  // namespace binllm_cpu
