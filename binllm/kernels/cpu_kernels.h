// The shared declarations of binllm's CPU kernels (binllm/kernels/cpu_build.py builds the .cpp
// files beside this one into one extension, torch.ops.binllm_cpu and a Python module):
//   cpu_gemv.cpp      the bit-plane lookup-table GEMV of a BitPart (decode, small batches)
//   cpu_lut.cpp       its lookups over row tiles (portable and AVX-512 loops)
//   cpu_sparse.cpp    PB-LLM's salient weights (a SparsePart's CSR product)
//   cpu_prefill.cpp   the prefill rebuilds of a BitPart's rows (fp32, bf16) and x's columns
//   cpu_int8.cpp      the int8 prefill: a prompt's column smoothing, int8 rows, scaled sums
//   cpu_uniform8.cpp  8-bit UniformCodes read in place (a q8 table as the output layer)
//   cpu_decode.cpp    the lean decode loop's fused glue: RMSNorm, rotary + cache + attention
//   cpu_attend.cpp    its attention for the heads of one KV group (AVX-512; cpu_vec.h helpers)
//   cpu_layers.cpp    the lean decode loop's decoder layers, one compiled call per token
//   cpu_dense.cpp     a dense bf16 weight times one token (the lean loop's bf16 linears)
//   cpu_ops.cpp       form_gemv (a whole form at decode), the Decoder class, op registration
// Here: the row tile, the checks' error, a BitPart's tensors as the loops read them (Part),
// bf16 <-> fp32, and the functions one file calls in another.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace binllm_cpu {

constexpr int64_t TILE = 16;  // rows of a plane tile: [i, k, b, q] = byte b of row 16 i + q

inline void check(bool ok, const char* what) { TORCH_CHECK(ok, "binllm_cpu: ", what); }

struct Part {
  const float* tab;   // (N, V, P/4, 16) subset sums
  const float* sums;  // (N, V, nseg) segment sums
  const uint8_t* planes; const int64_t* terms; const int64_t* cptr; const int64_t* cidx;
  const float* fac; const void* coef; bool half;
  const int64_t* seg;
  int64_t N, V, P, rows, PB, NP, T, nseg;
  int64_t bl = 0, bh = 0;  // this pass's byte columns [bl, bh): the tables of a pass stay in L2
  int64_t C = 0;            // coefficient arrays (coef's first dimension)
  // coef tile by tile, (ceil(rows/16), nseg, C, 16) with zero padding rows, or null: the
  // coefficients one row tile reads are contiguous (a Decoder keeps this copy)
  const void* tcoef = nullptr;
  const uint8_t* tile(int64_t i, int64_t k) const { return planes + ((i * NP + k) * PB) * TILE; }
  const float* table(int64_t n, int64_t v) const { return tab + (n * V + v) * (P / 4) * 16; }
  // C_t[s, r .. r + nr)
  void coefs(int64_t t, int64_t s, int64_t r, int64_t nr, float* c) const {
    for (int64_t q = 0; q < nr; ++q) c[q] = 0.f;
    for (int64_t k = cptr[t]; k < cptr[t + 1]; ++k) {
      const int64_t at = (cidx[k] * nseg + s) * rows + r;
      for (int64_t q = 0; q < nr; ++q)
        c[q] += fac[k] * (half ? static_cast<float>(static_cast<const c10::Half*>(coef)[at + q])
                               : static_cast<const float*>(coef)[at + q]);
    }
  }
};

// fp32 -> bf16 bits, round to nearest even, NaN -> 0x7FC0: c10::BFloat16(float)'s rounding
inline uint16_t bf16_bits(float f) { return c10::BFloat16(f).x; }

// bf16 bits -> fp32, exactly (the bits are fp32's upper half)
inline float bf16_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

#ifdef __AVX512F__
// the same for 16 values at once
inline __m512 bf16_float16(__m256i b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// the same rounding for 16 floats at once (integer ops: no AVX512-BF16 flush of denormals)
inline __m256i bf16_bits16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i bias = _mm512_add_epi32(
      _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
#endif

// -- cpu_gemv.cpp ---------------------------------------------------------------------------
void check_part(const at::Tensor& planes, const at::Tensor& terms, const at::Tensor& cptr,
                const at::Tensor& cidx, const at::Tensor& fac, const at::Tensor& coef,
                const at::Tensor& seg);
void check_bitpart(const at::Tensor& perm, const at::Tensor& scale, const at::Tensor& planes,
                   const at::Tensor& terms, const at::Tensor& cptr, const at::Tensor& cidx,
                   const at::Tensor& fac, const at::Tensor& coef, const at::Tensor& seg);
void bitpart_rows(const float* x, int64_t N, int64_t cols, const at::Tensor& perm,
                  const at::Tensor& scale, const at::Tensor& planes, const at::Tensor& terms,
                  const at::Tensor& cptr, const at::Tensor& cidx, const at::Tensor& fac,
                  const at::Tensor& coef, const at::Tensor& seg, bool in_order, float* out,
                  int64_t impl, const at::Tensor* tcoef = nullptr);
// coef (C, nseg, rows) tile by tile: (ceil(rows/16), nseg, C, 16), padding rows 0 (Part.tcoef)
at::Tensor tile_major(const at::Tensor& coef);
void bitpart(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& scale,
             const at::Tensor& planes, const at::Tensor& terms, const at::Tensor& cptr,
             const at::Tensor& cidx, const at::Tensor& fac, const at::Tensor& coef,
             const at::Tensor& seg, at::Tensor y, int64_t impl, bool in_order);

// -- cpu_lut.cpp ----------------------------------------------------------------------------
// y[rows of tiles i0 .. i1) += the part's product (p's tables built for bytes [p.bl, p.bh))
void tiles_generic(const Part& p, float* y, int64_t i0, int64_t i1);
#ifdef __AVX512F__
bool tiles_avx512(const Part& p, float* y, int64_t i0, int64_t i1);  // false: more than 8 inputs
#endif

// -- cpu_sparse.cpp -------------------------------------------------------------------------
void check_sparse(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& q,
                  const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& sub,
                  int64_t groupsize);
void sparse_rows(const float* x, int64_t N, int64_t cols, const at::Tensor& rowptr,
                 const at::Tensor& col, const at::Tensor& q, const at::Tensor& scale,
                 const at::Tensor& zero, const at::Tensor& sub, int64_t groupsize, float* y,
                 int64_t impl);
void sparse(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
            const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
            const at::Tensor& sub, int64_t groupsize, at::Tensor y, int64_t impl);

// -- cpu_prefill.cpp ------------------------------------------------------------------------
void bitpart_dense(const at::Tensor& planes, const at::Tensor& terms, const at::Tensor& cptr,
                   const at::Tensor& cidx, const at::Tensor& fac, const at::Tensor& coef,
                   const at::Tensor& seg, int64_t v, int64_t r0, at::Tensor out);
void bitpart_dense_bf16(const at::Tensor& planes, const at::Tensor& terms, const at::Tensor& cptr,
                        const at::Tensor& cidx, const at::Tensor& fac, const at::Tensor& coef,
                        const at::Tensor& seg, const at::Tensor& scale, int64_t r0,
                        at::Tensor out, int64_t impl);
void columns_bf16(const at::Tensor& x, const at::Tensor& perm, at::Tensor out);
void smoothing_bf16(const at::Tensor& src, at::Tensor c);
void rows_int8(const at::Tensor& src, const at::Tensor& colscale, at::Tensor q,
               at::Tensor scale);
void scale_int32(const at::Tensor& acc, const at::Tensor& sx, const at::Tensor& sw,
                 at::Tensor y);

// -- cpu_uniform8.cpp -----------------------------------------------------------------------
at::Tensor uniform8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                         const at::Tensor& zero, int64_t groupsize, int64_t impl);
void uniform8_dense_bf16(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                         int64_t groupsize, int64_t r0, at::Tensor out, int64_t impl);

// -- cpu_decode.cpp -------------------------------------------------------------------------
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t impl);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                            at::Tensor v_cache, int64_t pos, double scale, int64_t impl);

// -- cpu_attend.cpp -------------------------------------------------------------------------
// one token's attention for the G heads sharing one cached K and V (n, hd): out (G, hd) from q
// (G, hd) fp32, s (G, n) scratch; false where not compiled for AVX-512 or hd > 128
template <typename T>
bool attend_group(const float* q, int64_t G, const T* K, const T* V, int64_t n, int64_t hd,
                  float scale, float* s, T* out);

// -- cpu_dense.cpp --------------------------------------------------------------------------
at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, int64_t impl);

// -- cpu_ops.cpp ----------------------------------------------------------------------------
// form_gemv of one form's stages in turn (fp32 between stages, the last in x's dtype with the
// bias rounded to it first), the form's tensors checked once when it is built; a call checks
// only x and the bias. Stages: [(rows, parts, sparse, groupsize, in_order)] as form_gemv takes
// them.
class Decoder {
 public:
  using Stages = std::vector<std::tuple<int64_t, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                        int64_t, std::vector<int64_t>>>;
  Decoder(Stages stages, int64_t cols, int64_t max_numel, int64_t impl);
  // y (..., rows) of x (..., cols) fp32, bf16 or fp16 on the CPU of at most max_numel elements,
  // no gradient wanted, with bias b (rows,) or null; undefined for any other input
  at::Tensor forward(const at::Tensor& x, const at::Tensor* b) const;
  // bytes the decoder holds beside the form's tensors (its tile-major coefficients)
  int64_t nbytes() const;

 private:
  struct Stage {
    int64_t rows;
    std::vector<at::Tensor> parts, sparse;
    int64_t groupsize;
    std::vector<int64_t> in_order;
    std::vector<at::Tensor> tcoefs;  // each part's coef tile by tile (tile_major)
  };
  int64_t cols_, max_numel_, impl_;
  std::vector<Stage> stages_;
};

}  // namespace binllm_cpu
