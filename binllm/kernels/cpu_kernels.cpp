// CPU kernels of binllm's kernel form (binllm/kernels/form.py), registered as torch.ops.binllm_cpu.
//
// bitpart(x, perm, scale, planes, terms, cptr, cidx, fac, coef, seg, y, impl):
//   xv[n, v, j] = x[n, perm[j]] * scale[v, j]   (0 where perm[j] < 0; scale empty: V = 1, ones)
//   y[n, r] += sum_t sum_s C_t[s, r] * sum_{j in s} B_t[r, j] * xv[n, v_t, j]
//   B_t = plane p_t AND plane p2_t (p2_t < 0: plane p_t; p_t < 0: all ones, the segment sum)
//   C_t = sum_{k in [cptr[t], cptr[t+1])} fac[k] * coef[cidx[k]]
//   x (N, cols) fp32, perm (P,) int64, scale (V, P) fp32 or (0,),
//   planes (ceil(rows/16), NP, P/8, 16) uint8: [i, k, b, q] = byte b of row 16 i + q of plane k
//   (bit l of byte b = column 8 b + l), terms (T, 3) int64 (p, p2, v), cptr (T + 1,) int64,
//   cidx (nnz,) int64, fac (nnz,) fp32, coef (C, nseg, rows) fp16 or fp32,
//   seg (nseg + 1,) int64 byte offsets, y (N, rows) fp32.
//   A lookup-table GEMV: per x version and 4 columns a table of the 16 subset sums; a plane
//   byte's two nibbles index the tables of its 8 columns. impl 0: AVX-512 (16 rows of a tile
//   in the 16 lanes: one byte load per row, two permutes of a 16-entry table; four partial
//   sums for one or two inputs), 1: portable. x is read in place where the part's columns are
//   x's in order with no scales.
// sparse(x, rowptr, col, q, scale, zero, sub, groupsize, y, impl): col uint16 or int32
//   y[n, r] += sum_k (scale[r] * (q_k - zero[r]) - sub[r, col_k / groupsize]) * x[n, col_k]
//   (AVX-512: 16 entries at once, x and sub gathered; col / groupsize by a shift, or in fp32
//   as floor((col + 0.5) / groupsize), exact for cols < 2^22)
// bitpart_dense(planes, terms, cptr, cidx, fac, coef, seg, v, r0, out):
//   out (n, P) = rows [r0, r0 + n) of the part's weight for x version v (the prefill path).
// bitpart_dense_bf16(planes, terms, cptr, cidx, fac, coef, seg, scale, r0, out, impl):
//   out (n, P) bf16 = rows [r0, r0 + n) of the part's whole weight, sum_v scale[v, j] * W_v[r, j]
//   (scale empty: V = 1), summed in fp32 and rounded once to bf16, round to nearest even as
//   torch rounds (the prefill path of bf16 inputs); out may be a column slice of a wider
//   buffer (row stride >= P), so that several parts fill one GEMM operand side by side.
//   Per row and segment a version's constant terms are summed once; impl 0: AVX-512 (32 then
//   16 columns per step, one masked add per plane term), 1: portable (8 columns of a byte).
// columns_bf16(x, perm, out): out[n, j] = x[n, perm[j]] (0 where perm[j] < 0), x (N, cols) bf16,
//   out (N, P) bf16 (row stride >= P): a part's x columns, the other operand of that GEMM.
// form_gemv(x, rows, parts, sparse, groupsize, bias, dtype, impl) -> y: a whole KernelForm at
//   decode: x (..., cols) fp32, bf16 or fp16 (any N; read in
//   fp32, exactly), parts 9 tensors per BitPart (bitpart's perm ... seg, scale (0,) for none),
//   sparse none or sparse's 6 (rowptr ... sub); per SMALL_BATCH inputs the parts then the
//   sparse part add into one fp32 sum from 0 (bitpart's and sparse's loops: cpu.py's _compiled),
//   rounded once to dtype and, with a bias (rows,) of dtype, + bias rounded again: y (..., rows)
//   of dtype equals form_matmul(x).to(dtype) + bias bit for bit.
// uniform8_gemv(x, q, scale, zero, groupsize, impl) -> y (N, rows) f32: 8-bit UniformCodes read
//   in place, y[n, r] = sum_j scale[r, g] (q[r, j] - zero[r, g]) x[n, j], g = j / groupsize;
//   x (N, cols) f32, bf16 or f16, q (rows * cols,) uint8, scale (rows, groups) f16 or f32,
//   zero (rows * groups,) uint8 (the packed tensors); per group the exact levels q - zero times
//   x summed in fp32, times the scale (impl 0: AVX-512, one input four rows at a time).
// uniform8_dense_bf16(q, scale, zero, groupsize, r0, out, impl): out (n, cols) bf16 = rows
//   [r0, r0 + n) of scale (q - zero), rounded as UniformCodes.dequantize().to(torch.bfloat16)
//   rounds them (the prompt path of a bf16 model's q8 output layer; row stride >= cols).
// Decoder (a Python class, the module's only binding): form_gemv of one form's stages, the
//   form checked once when it is built, each call straight from Python (binllm/kernels/cpu.py).
// Every loop reads only the packed planes; row tiles are split over torch's intra-op threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace {

constexpr int64_t TILE = 16;
constexpr int64_t SMALL_BATCH_U8 = 8;  // inputs per uniform8_gemv pass (its accumulators)

struct Part {
  const float* tab;   // (N, V, P/4, 16) subset sums
  const float* sums;  // (N, V, nseg) segment sums
  const uint8_t* planes; const int64_t* terms; const int64_t* cptr; const int64_t* cidx;
  const float* fac; const void* coef; bool half;
  const int64_t* seg;
  int64_t N, V, P, rows, PB, NP, T, nseg;
  int64_t bl = 0, bh = 0;  // this pass's byte columns [bl, bh): the tables of a pass stay in L2
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

// tab[n, v, g, i] = sum of xv[n, v, 4 g + l] over the bits l of i, added from 0 in the order
// of l (AVX-512: entry i in lane i, x[l] added where bit l of i is set: the same sums)
void build_tables(const float* xv, int64_t NV, int64_t P, float* tab) {
  const int64_t G = P / 4;
  at::parallel_for(0, NV * G, 4096, [&](int64_t a, int64_t b) {
    for (int64_t q = a; q < b; ++q) {
      const float* x = xv + (q / G) * P + (q % G) * 4;
      float* t = tab + q * 16;
#ifdef __AVX512F__
      __m512 s = _mm512_setzero_ps();
      const __mmask16 bit[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
      for (int l = 0; l < 4; ++l) s = _mm512_mask_add_ps(s, bit[l], s, _mm512_set1_ps(x[l]));
      _mm512_storeu_ps(t, s);
#else
      for (int i = 0; i < 16; ++i) {
        float s = 0.f;
        for (int l = 0; l < 4; ++l)
          if (i >> l & 1) s += x[l];
        t[i] = s;
      }
#endif
    }
  });
}

// portable: the same lookups, the 16 rows of a tile in an inner loop (vectorisable)
void tiles_generic(const Part& p, float* y, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = i * TILE, nr = std::min<int64_t>(TILE, p.rows - r);
    for (int64_t n = 0; n < p.N; ++n) {
      float tot[TILE] = {}, c[TILE] = {}, acc[TILE];
      for (int64_t s = 0; s < p.nseg; ++s) {
        if (p.seg[s + 1] <= p.bl || p.seg[s] >= p.bh) continue;
        const int64_t b0 = std::max(p.seg[s], p.bl), b1 = std::min(p.seg[s + 1], p.bh);
        for (int64_t t = 0; t < p.T; ++t) {
          const int64_t* tm = p.terms + 3 * t;
          if (tm[0] < 0 && p.seg[s] < p.bl) continue;  // counted in the segment's first pass
          p.coefs(t, s, r, nr, c);
          if (tm[0] < 0) {
            const float sum = p.sums[(n * p.V + tm[2]) * p.nseg + s];
            for (int q = 0; q < TILE; ++q) tot[q] += c[q] * sum;
            continue;
          }
          const uint8_t* pa = p.tile(i, tm[0]);
          const uint8_t* pb = tm[1] >= 0 ? p.tile(i, tm[1]) : pa;
          const float* tb = p.table(n, tm[2]);
          for (int q = 0; q < TILE; ++q) acc[q] = 0.f;
          for (int64_t b = b0; b < b1; ++b)
            for (int q = 0; q < TILE; ++q) {
              const unsigned byte = pa[b * TILE + q] & pb[b * TILE + q];
              acc[q] += tb[32 * b + (byte & 15u)] + tb[32 * b + 16 + (byte >> 4)];
            }
          for (int q = 0; q < TILE; ++q) tot[q] += c[q] * acc[q];
        }
      }
      for (int64_t q = 0; q < nr; ++q) y[n * p.rows + r + q] += tot[q];
    }
  }
}

#ifdef __AVX512F__
inline __m512i bytes16(const uint8_t* b) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
}

// sum over the segment's bytes [b0, b1) of the table lookups of B's 16 rows, N inputs
template <int N, bool AND>
inline void lookups(const Part& p, const uint8_t* q1, const uint8_t* q2, int64_t v, int64_t b0,
                    int64_t b1, __m512* acc) {
  const float* tb[N];
  for (int n = 0; n < N; ++n) tb[n] = p.table(n, v);
  __m512 acc2[N];
  for (int n = 0; n < N; ++n) acc[n] = acc2[n] = _mm512_setzero_ps();
  int64_t b = b0;
  if constexpr (N <= 2) {  // few inputs: two more sums, so that the adds' latency is hidden
    __m512 acc3[N], acc4[N];
    for (int n = 0; n < N; ++n) acc3[n] = acc4[n] = _mm512_setzero_ps();
    for (; b + 2 <= b1; b += 2) {
      __m512i lo = bytes16(q1 + b * TILE), lo2 = bytes16(q1 + (b + 1) * TILE);
      if (AND) {
        lo = _mm512_and_si512(lo, bytes16(q2 + b * TILE));
        lo2 = _mm512_and_si512(lo2, bytes16(q2 + (b + 1) * TILE));
      }
      const __m512i hi = _mm512_srli_epi32(lo, 4), hi2 = _mm512_srli_epi32(lo2, 4);
      for (int n = 0; n < N; ++n) {
        const float* t = tb[n] + 32 * b;
        acc[n] = _mm512_add_ps(acc[n], _mm512_permutexvar_ps(lo, _mm512_loadu_ps(t)));
        acc2[n] = _mm512_add_ps(acc2[n], _mm512_permutexvar_ps(hi, _mm512_loadu_ps(t + 16)));
        acc3[n] = _mm512_add_ps(acc3[n], _mm512_permutexvar_ps(lo2, _mm512_loadu_ps(t + 32)));
        acc4[n] = _mm512_add_ps(acc4[n], _mm512_permutexvar_ps(hi2, _mm512_loadu_ps(t + 48)));
      }
    }
    for (int n = 0; n < N; ++n) {
      acc[n] = _mm512_add_ps(acc[n], acc3[n]);
      acc2[n] = _mm512_add_ps(acc2[n], acc4[n]);
    }
  }
  for (; b < b1; ++b) {
    __m512i lo = bytes16(q1 + b * TILE);
    if (AND) lo = _mm512_and_si512(lo, bytes16(q2 + b * TILE));
    const __m512i hi = _mm512_srli_epi32(lo, 4);  // permutexvar reads index bits 3:0 only
    for (int n = 0; n < N; ++n) {
      const float* t = tb[n] + 32 * b;
      acc[n] = _mm512_add_ps(acc[n], _mm512_permutexvar_ps(lo, _mm512_loadu_ps(t)));
      acc2[n] = _mm512_add_ps(acc2[n], _mm512_permutexvar_ps(hi, _mm512_loadu_ps(t + 16)));
    }
  }
  for (int n = 0; n < N; ++n) acc[n] = _mm512_add_ps(acc[n], acc2[n]);
}

// C_t[s, r .. r + 16) (lanes outside m: 0)
inline __m512 coef16(const Part& p, int64_t t, int64_t s, int64_t r, __mmask16 m) {
  __m512 c = _mm512_setzero_ps();
  for (int64_t k = p.cptr[t]; k < p.cptr[t + 1]; ++k) {
    const int64_t at = (p.cidx[k] * p.nseg + s) * p.rows + r;
    const __m512 a = p.half ?
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p.coef) + at)) :
        _mm512_maskz_loadu_ps(m, static_cast<const float*>(p.coef) + at);
    c = _mm512_fmadd_ps(_mm512_set1_ps(p.fac[k]), a, c);
  }
  return c;
}

template <int N>
void tile_lut(const Part& p, float* y, int64_t i) {
  const int64_t r = i * TILE;
  const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(TILE, p.rows - r)) - 1u);
  __m512 tot[N], acc[N];
  for (int n = 0; n < N; ++n) tot[n] = _mm512_setzero_ps();
  for (int64_t s = 0; s < p.nseg; ++s) {
    if (p.seg[s + 1] <= p.bl || p.seg[s] >= p.bh) continue;
    const int64_t b0 = std::max(p.seg[s], p.bl), b1 = std::min(p.seg[s + 1], p.bh);
    for (int64_t t = 0; t < p.T; ++t) {
      const int64_t* tm = p.terms + 3 * t;
      if (tm[0] < 0 && p.seg[s] < p.bl) continue;  // counted in the segment's first pass
      const __m512 c = coef16(p, t, s, r, m);
      if (tm[0] < 0) {  // constant term: the segment sum
        for (int n = 0; n < N; ++n)
          tot[n] = _mm512_fmadd_ps(
              c, _mm512_set1_ps(p.sums[(n * p.V + tm[2]) * p.nseg + s]), tot[n]);
        continue;
      }
      if (tm[1] >= 0)
        lookups<N, true>(p, p.tile(i, tm[0]), p.tile(i, tm[1]), tm[2], b0, b1, acc);
      else
        lookups<N, false>(p, p.tile(i, tm[0]), nullptr, tm[2], b0, b1, acc);
      for (int n = 0; n < N; ++n) tot[n] = _mm512_fmadd_ps(c, acc[n], tot[n]);
    }
  }
  for (int n = 0; n < N; ++n) {
    float* o = y + n * p.rows + r;
    _mm512_mask_storeu_ps(o, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), tot[n]));
  }
}

template <int N>
void tiles_avx512(const Part& p, float* y, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) tile_lut<N>(p, y, i);
}

bool tiles_avx512_dispatch(const Part& p, float* y, int64_t i0, int64_t i1) {
  switch (p.N) {
    case 1: tiles_avx512<1>(p, y, i0, i1); return true;
    case 2: tiles_avx512<2>(p, y, i0, i1); return true;
    case 3: tiles_avx512<3>(p, y, i0, i1); return true;
    case 4: tiles_avx512<4>(p, y, i0, i1); return true;
    case 5: tiles_avx512<5>(p, y, i0, i1); return true;
    case 6: tiles_avx512<6>(p, y, i0, i1); return true;
    case 7: tiles_avx512<7>(p, y, i0, i1); return true;
    case 8: tiles_avx512<8>(p, y, i0, i1); return true;
    default: return false;
  }
}
#endif

void check(bool ok, const char* what) { TORCH_CHECK(ok, "binllm_cpu: ", what); }

void check_part(const at::Tensor& planes, const at::Tensor& terms, const at::Tensor& cptr,
                const at::Tensor& cidx, const at::Tensor& fac, const at::Tensor& coef,
                const at::Tensor& seg) {
  check(planes.dim() == 4 && planes.size(3) == TILE && planes.scalar_type() == at::kByte &&
            planes.is_contiguous(), "planes (ceil(rows/16), NP, P/8, 16) uint8");
  check(terms.dim() == 2 && terms.size(1) == 3 && terms.scalar_type() == at::kLong &&
            terms.is_contiguous(), "terms (T, 3) int64");
  check(cptr.scalar_type() == at::kLong && cptr.is_contiguous() &&
            cptr.numel() == terms.size(0) + 1 && cidx.scalar_type() == at::kLong &&
            cidx.is_contiguous() && fac.scalar_type() == at::kFloat && fac.is_contiguous() &&
            fac.numel() == cidx.numel(), "cptr (T + 1,) int64, cidx (nnz,) int64, fac f32");
  check(coef.dim() == 3 && (coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kHalf) &&
            coef.is_contiguous(), "coef (C, nseg, rows) f32 or f16");
  check(seg.scalar_type() == at::kLong && seg.is_contiguous() && seg.size(0) == coef.size(1) + 1,
        "seg (nseg + 1,) int64");
  const int64_t *tm = terms.data_ptr<int64_t>(), *cp = cptr.data_ptr<int64_t>(),
                *ci = cidx.data_ptr<int64_t>();
  for (int64_t t = 0; t < terms.size(0); ++t)
    check(tm[3 * t] < planes.size(1) && tm[3 * t + 1] < planes.size(1) &&
              (tm[3 * t] >= 0 || tm[3 * t + 1] < 0) && cp[t] >= 0 && cp[t] <= cp[t + 1] &&
              cp[t + 1] <= cidx.numel(), "terms outside the planes or entries");
  for (int64_t k = 0; k < cidx.numel(); ++k)
    check(ci[k] >= 0 && ci[k] < coef.size(0), "cidx outside coef");
}

// xv (N, V, P) of x (N, cols), gathered and scaled
std::vector<float> inputs(const float* xp, int64_t N, int64_t cols, const at::Tensor& perm,
                          const at::Tensor& scale, int64_t V) {
  const int64_t P = perm.size(0);
  std::vector<float> xv(N * V * P, 0.f);
  const int64_t* pp = perm.data_ptr<int64_t>();
  const float* sp = scale.numel() ? scale.data_ptr<float>() : nullptr;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < V; ++v) {
      float* o = xv.data() + (n * V + v) * P;
      for (int64_t j = 0; j < P; ++j) {
        const int64_t c = pp[j];
        check(c < cols, "perm outside x");
        if (c >= 0) o[j] = sp ? xp[n * cols + c] * sp[v * P + j] : xp[n * cols + c];
      }
    }
  return xv;
}

// the sum of x[0 .. n) in double (n a multiple of 8; impl 0: AVX-512, 16 partial sums)
double segment_sum(const float* x, int64_t n, int64_t impl) {
  double s = 0;
  int64_t j = 0;
#ifdef __AVX512F__
  if (impl == 0) {
    __m512d a = _mm512_setzero_pd(), b = _mm512_setzero_pd();
    for (; j + 16 <= n; j += 16) {
      a = _mm512_add_pd(a, _mm512_cvtps_pd(_mm256_loadu_ps(x + j)));
      b = _mm512_add_pd(b, _mm512_cvtps_pd(_mm256_loadu_ps(x + j + 8)));
    }
    for (; j + 8 <= n; j += 8) a = _mm512_add_pd(a, _mm512_cvtps_pd(_mm256_loadu_ps(x + j)));
    s = _mm512_reduce_add_pd(_mm512_add_pd(a, b));
  }
#endif
  for (; j < n; ++j) s += x[j];
  return s;
}

// the checks of one BitPart's tensors (bitpart's arguments after x)
void check_bitpart(const at::Tensor& perm, const at::Tensor& scale, const at::Tensor& planes,
                   const at::Tensor& terms, const at::Tensor& cptr, const at::Tensor& cidx,
                   const at::Tensor& fac, const at::Tensor& coef, const at::Tensor& seg) {
  check(perm.dim() == 1 && perm.scalar_type() == at::kLong && perm.is_contiguous(),
        "perm (P,) int64");
  check_part(planes, terms, cptr, cidx, fac, coef, seg);
  const int64_t P = perm.size(0), rows = coef.size(2), nseg = coef.size(1);
  check(!scale.numel() || (scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                           scale.dim() == 2 && scale.size(1) == P), "scale (V, P) f32");
  check(P % 8 == 0 && planes.size(2) * 8 == P && planes.size(0) * TILE >= rows &&
            seg.data_ptr<int64_t>()[nseg] == P / 8, "inconsistent part shapes");
}

// y (N, rows) += the BitPart's product with x (N, cols), both fp32 contiguous (parts checked)
void bitpart_rows(const float* x, int64_t N, int64_t cols, const at::Tensor& perm,
                  const at::Tensor& scale, const at::Tensor& planes, const at::Tensor& terms,
                  const at::Tensor& cptr, const at::Tensor& cidx, const at::Tensor& fac,
                  const at::Tensor& coef, const at::Tensor& seg, float* out, int64_t impl) {
  const int64_t P = perm.size(0), rows = coef.size(2), nseg = coef.size(1);
  const int64_t V = scale.numel() ? scale.size(0) : 1;
  const int64_t* pp = perm.data_ptr<int64_t>();
  bool plain = V == 1 && !scale.numel() && P == cols;  // x itself: its columns in order
  for (int64_t j = 0; plain && j < P; ++j) plain = pp[j] == j;
  std::vector<float> gathered;
  if (!plain) gathered = inputs(x, N, cols, perm, scale, V);
  const float* xv = plain ? x : gathered.data();
  std::vector<float> tab(N * V * (P / 4) * 16), sums(N * V * nseg);
  build_tables(xv, N * V, P, tab.data());
  const int64_t* sg = seg.data_ptr<int64_t>();
  for (int64_t nv = 0; nv < N * V; ++nv)
    for (int64_t s = 0; s < nseg; ++s)  // once per call: exact enough and cheap
      sums[nv * nseg + s] = static_cast<float>(
          segment_sum(xv + nv * P + sg[s] * 8, (sg[s + 1] - sg[s]) * 8, impl));
  Part p{tab.data(), sums.data(), planes.data_ptr<uint8_t>(), terms.data_ptr<int64_t>(),
               cptr.data_ptr<int64_t>(), cidx.data_ptr<int64_t>(), fac.data_ptr<float>(),
               coef.data_ptr(), coef.scalar_type() == at::kHalf, sg, N, V, P, rows,
               planes.size(2), planes.size(1), terms.size(0), nseg};
  const int64_t tiles = (rows + TILE - 1) / TILE;
  // at least ~256k weight-terms per task: small layers stay on one thread
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, P * p.T * N));
  // passes over byte columns whose tables (128 B per byte, input and version) fit in ~384 KiB
  const int64_t chunk = std::max<int64_t>(16, 3072 / (N * V));
  for (p.bl = 0; p.bl < p.PB; p.bl += chunk) {
    p.bh = std::min(p.PB, p.bl + chunk);
    at::parallel_for(0, tiles, grain, [&](int64_t i0, int64_t i1) {
#ifdef __AVX512F__
      if (impl == 0 && tiles_avx512_dispatch(p, out, i0, i1)) return;
#endif
      tiles_generic(p, out, i0, i1);
    });
  }
}

void bitpart(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& scale,
             const at::Tensor& planes, const at::Tensor& terms, const at::Tensor& cptr,
             const at::Tensor& cidx, const at::Tensor& fac, const at::Tensor& coef,
             const at::Tensor& seg, at::Tensor y, int64_t impl) {
  check(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x (N, cols) f32");
  check_bitpart(perm, scale, planes, terms, cptr, cidx, fac, coef, seg);
  check(y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 2 &&
            y.size(0) == x.size(0) && y.size(1) == coef.size(2), "y (N, rows) f32");
  bitpart_rows(x.data_ptr<float>(), x.size(0), x.size(1), perm, scale, planes, terms, cptr, cidx,
               fac, coef, seg, y.data_ptr<float>(), impl);
}

void bitpart_dense(const at::Tensor& planes, const at::Tensor& terms, const at::Tensor& cptr,
                   const at::Tensor& cidx, const at::Tensor& fac, const at::Tensor& coef,
                   const at::Tensor& seg, int64_t v, int64_t r0, at::Tensor out) {
  check_part(planes, terms, cptr, cidx, fac, coef, seg);
  const int64_t P = planes.size(2) * 8, rows = coef.size(2), nseg = coef.size(1);
  const int64_t n = out.size(0), T = terms.size(0), PB = planes.size(2), NP = planes.size(1);
  check(out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(1) == P &&
            r0 >= 0 && r0 + n <= rows, "out (n, P) f32 inside the rows");
  const Part p{nullptr, nullptr, planes.data_ptr<uint8_t>(), terms.data_ptr<int64_t>(),
               cptr.data_ptr<int64_t>(), cidx.data_ptr<int64_t>(), fac.data_ptr<float>(),
               coef.data_ptr(), coef.scalar_type() == at::kHalf, seg.data_ptr<int64_t>(), 0, 0,
               P, rows, PB, NP, T, nseg};
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(8, 65536 / std::max<int64_t>(1, P * T)),
                   [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t r = r0 + i;
      float* w = o + i * P;
      std::fill(w, w + P, 0.f);
      auto byte_of = [&](int64_t k, int64_t col) -> unsigned {
        return p.planes[(((r / TILE) * NP + k) * PB + col) * TILE + r % TILE];
      };
      for (int64_t t = 0; t < T; ++t) {
        const int64_t* tt = p.terms + 3 * t;
        if (tt[2] != v) continue;
        for (int64_t s = 0; s < nseg; ++s) {
          float c;
          p.coefs(t, s, r, 1, &c);
          int64_t bb = p.seg[s];
#ifdef __AVX512F__
          const __m512 cv = _mm512_set1_ps(c);
          for (; bb < p.seg[s + 1]; bb += 2) {  // 16 columns: one masked add
            const bool two = bb + 1 < p.seg[s + 1];
            const __mmask16 lim = two ? 0xFFFFu : 0x00FFu;
            unsigned bits = 0xFFFFu;
            if (tt[0] >= 0) {
              bits = byte_of(tt[0], bb) | (two ? byte_of(tt[0], bb + 1) << 8 : 0u);
              if (tt[1] >= 0) bits &= byte_of(tt[1], bb) | (two ? byte_of(tt[1], bb + 1) << 8 : 0u);
            }
            const __m512 wv = _mm512_maskz_loadu_ps(lim, w + 8 * bb);
            _mm512_mask_storeu_ps(w + 8 * bb, lim, _mm512_mask_add_ps(
                wv, static_cast<__mmask16>(bits) & lim, wv, cv));
          }
#endif
          for (; bb < p.seg[s + 1]; ++bb) {
            const unsigned byte = tt[0] < 0 ? 0xffu :
                tt[1] < 0 ? byte_of(tt[0], bb) : byte_of(tt[0], bb) & byte_of(tt[1], bb);
            float* wb = w + 8 * bb;
            for (int k = 0; k < 8; ++k) wb[k] += c * static_cast<float>((byte >> k) & 1u);
          }
        }
      }
    }
  });
}

// fp32 -> bf16 bits, round to nearest even, NaN -> 0x7FC0: c10::BFloat16(float)'s rounding
inline uint16_t bf16_bits(float f) { return c10::BFloat16(f).x; }

#ifdef __AVX512F__
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

void bitpart_dense_bf16(const at::Tensor& planes, const at::Tensor& terms, const at::Tensor& cptr,
                        const at::Tensor& cidx, const at::Tensor& fac, const at::Tensor& coef,
                        const at::Tensor& seg, const at::Tensor& scale, int64_t r0,
                        at::Tensor out, int64_t impl) {
  check_part(planes, terms, cptr, cidx, fac, coef, seg);
  const int64_t P = planes.size(2) * 8, rows = coef.size(2), nseg = coef.size(1);
  const int64_t n = out.size(0), T = terms.size(0), PB = planes.size(2), NP = planes.size(1);
  const int64_t V = scale.numel() ? scale.size(0) : 1, ld = out.stride(0);
  check(planes.size(0) * TILE >= rows && seg.data_ptr<int64_t>()[nseg] == PB,
        "inconsistent part shapes");
  check(!scale.numel() || (scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                           scale.dim() == 2 && scale.size(1) == P), "scale (V, P) f32");
  check(out.scalar_type() == at::kBFloat16 && out.dim() == 2 && out.size(1) == P &&
            out.stride(1) == 1 && (n <= 1 || ld >= P) && r0 >= 0 && r0 + n <= rows,
        "out (n, P) bf16 with unit column stride, inside the rows");
  for (int64_t t = 0; t < T; ++t)
    check(terms.data_ptr<int64_t>()[3 * t + 2] < V, "term version outside the scales");
  const Part p{nullptr, nullptr, planes.data_ptr<uint8_t>(), terms.data_ptr<int64_t>(),
               cptr.data_ptr<int64_t>(), cidx.data_ptr<int64_t>(), fac.data_ptr<float>(),
               coef.data_ptr(), coef.scalar_type() == at::kHalf, seg.data_ptr<int64_t>(), 0, V,
               P, rows, PB, NP, T, nseg};
  const float* sc = scale.numel() ? scale.data_ptr<float>() : nullptr;
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  // per version v its constant terms (summed once per row and segment) and its plane terms
  // live[vb[v] .. vb[v + 1]), each list in term order
  std::vector<int64_t> cst, live, cb{0}, vb{0};
  for (int64_t v = 0; v < V; ++v) {
    for (int64_t t = 0; t < T; ++t)
      if (p.terms[3 * t + 2] == v) (p.terms[3 * t] < 0 ? cst : live).push_back(t);
    cb.push_back(static_cast<int64_t>(cst.size()));
    vb.push_back(static_cast<int64_t>(live.size()));
  }
  // one plane term (or one AND of two), one x version, no column scales (q1_0, rtn-sign):
  // a row's weights in a segment are bf16(base) or bf16(base + c)
  const bool two_valued = V == 1 && !sc && live.size() == 1;
  at::parallel_for(0, n, std::max<int64_t>(8, 65536 / std::max<int64_t>(1, P * T)),
                   [&](int64_t a, int64_t b) {
    std::vector<float> base(V), c(live.size());  // of the current row and segment
    for (int64_t i = a; i < b; ++i) {
      const int64_t r = r0 + i;
      uint16_t* w = o + i * ld;
      const uint8_t* tb = p.planes + (r / TILE) * NP * PB * TILE + r % TILE;
      // bits of plane k at byte columns bb, bb + 1 (two: both inside the segment)
      auto bits = [&](int64_t k, int64_t bb, bool two) -> unsigned {
        const uint8_t* q = tb + (k * PB + bb) * TILE;
        return q[0] | (two ? static_cast<unsigned>(q[TILE]) << 8 : 0u);
      };
      auto mask = [&](int64_t t, int64_t bb, bool two) -> unsigned {
        const int64_t* tt = p.terms + 3 * t;
        return tt[1] < 0 ? bits(tt[0], bb, two) : bits(tt[0], bb, two) & bits(tt[1], bb, two);
      };
      for (int64_t s = 0; s < nseg; ++s) {
        for (int64_t v = 0; v < V; ++v) {
          float sum = 0.f, ct;
          for (int64_t k = cb[v]; k < cb[v + 1]; ++k) {
            p.coefs(cst[k], s, r, 1, &ct);
            sum += ct;
          }
          base[v] = sum;
        }
        for (size_t k = 0; k < live.size(); ++k) p.coefs(live[k], s, r, 1, &c[k]);
        int64_t bb = p.seg[s];
#ifdef __AVX512F__
        if (impl == 0 && two_valued) {  // each weight one of two bf16 values: a blend by the bits
          const float unset = 0.f + base[0], set = 0.f + (base[0] + c[0]);  // the loops' sums
          const __m512i lo = _mm512_set1_epi16(static_cast<int16_t>(bf16_bits(unset)));
          const __m512i hi = _mm512_set1_epi16(static_cast<int16_t>(bf16_bits(set)));
          for (; bb < p.seg[s + 1]; bb += 4) {  // 32 columns (fewer at the segment's end)
            const int64_t nb = std::min<int64_t>(4, p.seg[s + 1] - bb);
            uint32_t m = 0;
            for (int64_t k = 0; k < nb; ++k) {
              const int64_t* tt = p.terms + 3 * live[0];
              unsigned byte = tb[(tt[0] * PB + bb + k) * TILE];
              if (tt[1] >= 0) byte &= tb[(tt[1] * PB + bb + k) * TILE];
              m |= byte << (8 * k);
            }
            const __mmask32 lim = nb == 4 ? 0xFFFFFFFFu : (1u << (8 * nb)) - 1u;
            _mm512_mask_storeu_epi16(w + 8 * bb, lim, _mm512_mask_blend_epi16(m, lo, hi));
          }
        }
        if (impl == 0) {
          for (; bb + 4 <= p.seg[s + 1]; bb += 4) {  // 32 columns: two registers of 16
            __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
            for (int64_t v = 0; v < V; ++v) {
              __m512 a0 = _mm512_set1_ps(base[v]), a1 = a0;
              for (int64_t k = vb[v]; k < vb[v + 1]; ++k) {
                const unsigned m = mask(live[k], bb, true) | mask(live[k], bb + 2, true) << 16;
                const __m512 cv = _mm512_set1_ps(c[k]);
                a0 = _mm512_mask_add_ps(a0, static_cast<__mmask16>(m), a0, cv);
                a1 = _mm512_mask_add_ps(a1, static_cast<__mmask16>(m >> 16), a1, cv);
              }
              if (sc) {
                t0 = _mm512_fmadd_ps(_mm512_loadu_ps(sc + v * P + 8 * bb), a0, t0);
                t1 = _mm512_fmadd_ps(_mm512_loadu_ps(sc + v * P + 8 * bb + 16), a1, t1);
              } else {
                t0 = _mm512_add_ps(t0, a0);
                t1 = _mm512_add_ps(t1, a1);
              }
            }
            _mm512_storeu_si512(w + 8 * bb, _mm512_inserti64x4(
                _mm512_castsi256_si512(bf16_bits16(t0)), bf16_bits16(t1), 1));
          }
          for (; bb < p.seg[s + 1]; bb += 2) {  // 16 columns (a segment's last ones)
            const bool two = bb + 1 < p.seg[s + 1];
            const __mmask16 lim = two ? 0xFFFFu : 0x00FFu;
            __m512 tot = _mm512_setzero_ps();
            for (int64_t v = 0; v < V; ++v) {
              __m512 acc = _mm512_set1_ps(base[v]);
              for (int64_t k = vb[v]; k < vb[v + 1]; ++k)
                acc = _mm512_mask_add_ps(acc, static_cast<__mmask16>(mask(live[k], bb, two)), acc,
                                         _mm512_set1_ps(c[k]));
              tot = sc ? _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lim, sc + v * P + 8 * bb), acc, tot)
                       : _mm512_add_ps(tot, acc);
            }
            _mm256_mask_storeu_epi16(w + 8 * bb, lim, bf16_bits16(tot));
          }
        }
#endif
        for (; bb < p.seg[s + 1]; ++bb)  // portable: one byte column, 8 columns
          for (int j = 0; j < 8; ++j) {
            float tot = 0.f;
            for (int64_t v = 0; v < V; ++v) {
              float acc = base[v];
              for (int64_t k = vb[v]; k < vb[v + 1]; ++k)
                if (mask(live[k], bb, false) >> j & 1u) acc += c[k];
              tot = sc ? std::fma(sc[v * P + 8 * bb + j], acc, tot) : tot + acc;
            }
            w[8 * bb + j] = bf16_bits(tot);
          }
      }
    }
  });
}

void columns_bf16(const at::Tensor& x, const at::Tensor& perm, at::Tensor out) {
  check(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x (N, cols) bf16");
  check(perm.dim() == 1 && perm.scalar_type() == at::kLong && perm.is_contiguous(),
        "perm (P,) int64");
  const int64_t N = x.size(0), cols = x.size(1), P = perm.size(0), ld = out.stride(0);
  check(out.scalar_type() == at::kBFloat16 && out.dim() == 2 && out.size(0) == N &&
            out.size(1) == P && out.stride(1) == 1 && (N <= 1 || ld >= P),
        "out (N, P) bf16 with unit column stride");
  const int64_t* pp = perm.data_ptr<int64_t>();
  for (int64_t j = 0; j < P; ++j) check(pp[j] < cols, "perm outside x");
  struct Run { int64_t j, c, len; };  // out columns [j, j + len) = x columns [c, c + len)
  std::vector<Run> runs;                // (c < 0: zeros)
  for (int64_t j = 0; j < P; ++j) {
    const int64_t c = pp[j] < 0 ? -1 : pp[j];
    if (!runs.empty()) {
      Run& last = runs.back();
      if ((c < 0 && last.c < 0) || (c >= 0 && last.c >= 0 && c == last.c + last.len)) {
        ++last.len;
        continue;
      }
    }
    runs.push_back({j, c, 1});
  }
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, P)),
                   [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n)
      for (const Run& u : runs) {
        uint16_t* dst = o + n * ld + u.j;
        if (u.c < 0) std::memset(dst, 0, u.len * sizeof(uint16_t));
        else std::memcpy(dst, xp + n * cols + u.c, u.len * sizeof(uint16_t));
      }
  });
}

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

// the checks of a SparsePart's tensors (sparse's arguments after x, before y)
void check_sparse(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& q,
                  const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& sub,
                  int64_t groupsize) {
  check(col.is_contiguous() && (col.scalar_type() == at::kInt || col.scalar_type() == at::kUInt16),
        "col (n,) int32 or uint16");
  check(rowptr.scalar_type() == at::kLong && q.scalar_type() == at::kByte &&
            sub.is_contiguous() && sub.dim() == 2 && groupsize > 0, "sparse part dtypes");
}

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

// -- 8-bit uniform codes read in place (a q8 embedding table as the output layer) -----------
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

// -- the decode forward: every part of a form on x in its own dtype, y rounded once ----------
constexpr int64_t SMALL_BATCH = 8;  // inputs per GEMV pass (binllm/kernels/cpu.py SMALL_BATCH)
constexpr int64_t BITPART_ARGS = 9;  // perm, scale, planes, terms, cptr, cidx, fac, coef, seg
constexpr int64_t SPARSE_ARGS = 6;   // rowptr, col, q, scale, zero, sub

bool float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// x[0 .. n) in fp32 (exact), held in buf
template <typename T>
const float* to_float(const T* x, int64_t n, std::vector<float>& buf) {
  buf.resize(n);
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]);
  return buf.data();
}

// out[i] = acc[i] rounded to T (as y.to(T) rounds), then + bias[i % rows] rounded to T (as a T
// addition rounds: in fp32, once)
template <typename T>
void store(const float* acc, int64_t n, int64_t rows, const T* bias, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = static_cast<T>(acc[i]);
    out[i] = bias ? static_cast<T>(static_cast<float>(v) + static_cast<float>(bias[i % rows])) : v;
  }
}

// the checks of one form's tensors as form_gemv takes them (x's width not included)
void check_form(int64_t rows, at::TensorList parts, at::TensorList sparse, int64_t groupsize) {
  check(parts.size() % BITPART_ARGS == 0 &&
            (sparse.empty() || static_cast<int64_t>(sparse.size()) == SPARSE_ARGS),
        "parts: 9 tensors per BitPart, sparse: none or 6");
  for (size_t i = 0; i < parts.size(); i += BITPART_ARGS) {
    const at::Tensor* a = parts.data() + i;
    check_bitpart(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]);
    check(a[7].size(2) == rows, "a part's rows are not y's");
  }
  if (!sparse.empty()) {
    check_sparse(sparse[0], sparse[1], sparse[2], sparse[3], sparse[4], sparse[5], groupsize);
    check(sparse[0].size(0) == rows + 1, "the sparse part's rows are not y's");
  }
}

// form_gemv after its checks: x (..., cols) fp32, bf16 or fp16, bias (rows,) of dtype or null
at::Tensor gemv_checked(const at::Tensor& x, int64_t rows, at::TensorList parts,
                        at::TensorList sparse, int64_t groupsize, const at::Tensor* b,
                        at::ScalarType dtype, int64_t impl) {
  const int64_t cols = x.size(-1), N = cols ? x.numel() / cols : 0;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = rows;
  at::Tensor y = at::empty(shape, x.options().dtype(dtype));
  const at::Tensor xc = x.contiguous();
  std::vector<float> xf, acc(std::min(N, SMALL_BATCH) * rows);
  for (int64_t n0 = 0; n0 < N; n0 += SMALL_BATCH) {  // the sums of cpu.py's _compiled
    const int64_t n = std::min(SMALL_BATCH, N - n0);
    const float* xp = x.scalar_type() == at::kFloat ? xc.data_ptr<float>() + n0 * cols :
        x.scalar_type() == at::kBFloat16 ? to_float(xc.data_ptr<at::BFloat16>() + n0 * cols,
                                                    n * cols, xf) :
        to_float(xc.data_ptr<at::Half>() + n0 * cols, n * cols, xf);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (size_t i = 0; i < parts.size(); i += BITPART_ARGS) {
      const at::Tensor* a = parts.data() + i;
      bitpart_rows(xp, n, cols, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], acc.data(),
                   impl);
    }
    if (!sparse.empty())
      sparse_rows(xp, n, cols, sparse[0], sparse[1], sparse[2], sparse[3], sparse[4], sparse[5],
                  groupsize, acc.data(), impl);
    const int64_t first = n0 * rows, count = n * rows;  // y's entries of these inputs
    switch (dtype) {
      case at::kFloat:
        store(acc.data(), count, rows, b ? b->data_ptr<float>() : nullptr,
              y.data_ptr<float>() + first);
        break;
      case at::kBFloat16:
        store(acc.data(), count, rows, b ? b->data_ptr<at::BFloat16>() : nullptr,
              y.data_ptr<at::BFloat16>() + first);
        break;
      default:
        store(acc.data(), count, rows, b ? b->data_ptr<at::Half>() : nullptr,
              y.data_ptr<at::Half>() + first);
    }
  }
  return y;
}

at::Tensor form_gemv(const at::Tensor& x, int64_t rows, at::TensorList parts,
                     at::TensorList sparse, int64_t groupsize,
                     const std::optional<at::Tensor>& bias, at::ScalarType dtype, int64_t impl) {
  check(x.dim() >= 1 && float_type(x.scalar_type()) && float_type(dtype),
        "x (..., cols) and y fp32, bf16 or fp16");
  check_form(rows, parts, sparse, groupsize);
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check(!b || (b->scalar_type() == dtype && b->dim() == 1 && b->size(0) == rows &&
               b->is_contiguous()), "bias (rows,) in y's dtype");
  return gemv_checked(x, rows, parts, sparse, groupsize, b, dtype, impl);
}

// -- Decoder: form_gemv of one form (its stages in turn), checked once, called from Python ---
// Decoder(stages, cols, max_numel, impl), stages [(rows, parts, sparse, groupsize)]:
// decoder(x, bias) is form_gemv of each stage in turn (fp32 between stages, the last in x's
// dtype with the bias rounded to it first) for x (..., cols) fp32, bf16 or fp16 on the CPU of
// at most max_numel elements, no gradient wanted; None for any other input. The form's tensors
// are checked when it is built, so a call checks only x and the bias (binllm/kernels/cpu.py).
class Decoder {
 public:
  struct Stage {
    int64_t rows;
    std::vector<at::Tensor> parts, sparse;
    int64_t groupsize;
  };

  Decoder(std::vector<std::tuple<int64_t, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                 int64_t>> stages, int64_t cols, int64_t max_numel, int64_t impl)
      : cols_(cols), max_numel_(max_numel), impl_(impl) {
    check(!stages.empty(), "a form has at least one stage");
    int64_t width = cols;
    for (auto& [rows, parts, sparse, groupsize] : stages) {
      check_form(rows, parts, sparse, groupsize);
      for (size_t i = 0; i < parts.size(); i += BITPART_ARGS) {
        const at::Tensor& perm = parts[i];
        check(perm.numel() == 0 || perm.max().item<int64_t>() < width, "perm outside x");
      }
      stages_.push_back({rows, std::move(parts), std::move(sparse), groupsize});
      width = rows;
    }
  }

  py::object operator()(const at::Tensor& x, const std::optional<at::Tensor>& bias) const {
    const at::Tensor* b = bias.has_value() && bias->defined() ? &*bias : nullptr;
    if (!x.device().is_cpu() || !float_type(x.scalar_type()) || x.dim() < 1 ||
        x.size(-1) != cols_ || x.numel() > max_numel_ || x.is_sparse() ||
        (at::GradMode::is_enabled() && (x.requires_grad() || (b && b->requires_grad()))))
      return py::none();  // another device or dtype, a prefill, a backward: the registry's path
    const Stage& last = stages_.back();
    at::Tensor cast;
    if (b) {
      if (!b->device().is_cpu() || b->dim() != 1 || b->size(0) != last.rows)
        return py::none();
      if (b->scalar_type() != x.scalar_type() || !b->is_contiguous()) {
        cast = b->to(x.scalar_type()).contiguous();
        b = &cast;
      }
    }
    at::Tensor t = x;
    for (size_t i = 0; i + 1 < stages_.size(); ++i) {
      const Stage& s = stages_[i];
      t = gemv_checked(t, s.rows, s.parts, s.sparse, s.groupsize, nullptr, at::kFloat, impl_);
    }
    return py::cast(gemv_checked(t, last.rows, last.parts, last.sparse, last.groupsize, b,
                                 x.scalar_type(), impl_));
  }

 private:
  int64_t cols_, max_numel_, impl_;
  std::vector<Stage> stages_;
};

bool has_avx512() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(binllm_cpu, m) {
  m.def("bitpart(Tensor x, Tensor perm, Tensor scale, Tensor planes, Tensor terms, Tensor cptr, "
        "Tensor cidx, Tensor fac, Tensor coef, Tensor seg, Tensor(a!) y, int impl) -> ()");
  m.def("bitpart_dense(Tensor planes, Tensor terms, Tensor cptr, Tensor cidx, Tensor fac, "
        "Tensor coef, Tensor seg, int v, int r0, Tensor(a!) out) -> ()");
  m.def("bitpart_dense_bf16(Tensor planes, Tensor terms, Tensor cptr, Tensor cidx, Tensor fac, "
        "Tensor coef, Tensor seg, Tensor scale, int r0, Tensor(a!) out, int impl) -> ()");
  m.def("columns_bf16(Tensor x, Tensor perm, Tensor(a!) out) -> ()");
  m.def("sparse(Tensor x, Tensor rowptr, Tensor col, Tensor q, Tensor scale, Tensor zero, "
        "Tensor sub, int groupsize, Tensor(a!) y, int impl) -> ()");
  m.def("form_gemv(Tensor x, int rows, Tensor[] parts, Tensor[] sparse, int groupsize, "
        "Tensor? bias, ScalarType dtype, int impl) -> Tensor");
  m.def("uniform8_gemv(Tensor x, Tensor q, Tensor scale, Tensor zero, int groupsize, int impl) "
        "-> Tensor");
  m.def("uniform8_dense_bf16(Tensor q, Tensor scale, Tensor zero, int groupsize, int r0, "
        "Tensor(a!) out, int impl) -> ()");
  m.def("has_avx512() -> bool", has_avx512);
}

TORCH_LIBRARY_IMPL(binllm_cpu, CPU, m) {
  m.impl("bitpart", bitpart);
  m.impl("bitpart_dense", bitpart_dense);
  m.impl("bitpart_dense_bf16", bitpart_dense_bf16);
  m.impl("columns_bf16", columns_bf16);
  m.impl("sparse", sparse);
  m.impl("form_gemv", form_gemv);
  m.impl("uniform8_gemv", uniform8_gemv);
  m.impl("uniform8_dense_bf16", uniform8_dense_bf16);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Decoder>(m, "Decoder", py::dynamic_attr())
      .def(py::init<std::vector<std::tuple<int64_t, std::vector<at::Tensor>,
                                           std::vector<at::Tensor>, int64_t>>,
                    int64_t, int64_t, int64_t>())
      .def("__call__", &Decoder::operator(), py::arg("x"), py::arg("bias") = py::none());
}
