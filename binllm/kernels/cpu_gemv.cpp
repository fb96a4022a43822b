// The bit-plane GEMV of one BitPart (binllm/kernels/form.py's kernel form), the decode path:
//
// bitpart(x, perm, scale, planes, terms, cptr, cidx, fac, coef, seg, y, impl, in_order):
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
//   byte's two nibbles index the tables of its 8 columns (the loops over row tiles: cpu_lut.cpp).
//   impl 0: AVX-512 (four partial sums for one or two inputs, two for 3 to 8), 1: portable
//   (one sum). These group the fp32 sums differently, so AVX-512 and portable results, and
//   AVX-512 results of 1-2 and of 3-8 inputs, agree to fp32 round-off, not bit for bit.
//   in_order (BitPart.in_order: perm is 0 .. K - 1, then -1 padding) with K = P = cols and no
//   scales: x is read in place, not gathered.
// Every loop reads only the packed planes (nothing dequantized); row tiles are split over
// torch's intra-op threads. Where one pass covers the byte columns (decode: the tables of
// N·V inputs fit), each thread builds its own tables, so its lookups read them from its own
// cache rather than from the core that built them (binary-factor's two stages read fresh
// tables twice per call).
#include "cpu_kernels.h"

#include <ATen/ops/zeros.h>

#include <memory>

namespace binllm_cpu {
namespace {

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

// xv (N, V, P) of x (N, cols), gathered and scaled; in_order: column j is x's column j up to
// the padding, read without the per-column lookup and check (binary-factor's s_in ⊙ x and its
// second stage's r inputs, padded to a whole byte, at every decode call)
std::vector<float> inputs(const float* xp, int64_t N, int64_t cols, const at::Tensor& perm,
                          const at::Tensor& scale, int64_t V, bool in_order) {
  const int64_t P = perm.size(0);
  std::vector<float> xv(N * V * P, 0.f);
  const int64_t* pp = perm.data_ptr<int64_t>();
  const float* sp = scale.numel() ? scale.data_ptr<float>() : nullptr;
  int64_t K = P;  // in_order: perm is 0 .. K - 1, then its padding (-1)
  while (in_order && K > 0 && pp[K - 1] < 0) --K;
  check(!in_order || K <= cols, "perm outside x");
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < V; ++v) {
      float* o = xv.data() + (n * V + v) * P;
      const float* xn = xp + n * cols;
      if (in_order && sp) {
        for (int64_t j = 0; j < K; ++j) o[j] = xn[j] * sp[v * P + j];
      } else if (in_order) {
        std::memcpy(o, xn, K * sizeof(float));
      } else {
        for (int64_t j = 0; j < P; ++j) {
          const int64_t c = pp[j];
          check(c < cols, "perm outside x");
          if (c >= 0) o[j] = sp ? xn[c] * sp[v * P + j] : xn[c];
        }
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

}  // namespace

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

// y (N, rows) += the BitPart's product with x (N, cols), both fp32 contiguous (parts checked);
// in_order: perm is 0 .. K - 1 then -1 (BitPart.in_order, recorded when the part is built)
void bitpart_rows(const float* x, int64_t N, int64_t cols, const at::Tensor& perm,
                  const at::Tensor& scale, const at::Tensor& planes, const at::Tensor& terms,
                  const at::Tensor& cptr, const at::Tensor& cidx, const at::Tensor& fac,
                  const at::Tensor& coef, const at::Tensor& seg, bool in_order, float* out,
                  int64_t impl, const at::Tensor* tcoef) {
  const int64_t P = perm.size(0), rows = coef.size(2), nseg = coef.size(1);
  const int64_t V = scale.numel() ? scale.size(0) : 1;
  const bool unpadded = P == 0 || perm.data_ptr<int64_t>()[P - 1] >= 0;
  const bool plain = in_order && unpadded && V == 1 && !scale.numel() && P == cols;  // x itself
  std::vector<float> gathered;
  if (!plain) gathered = inputs(x, N, cols, perm, scale, V, in_order);
  const float* xv = plain ? x : gathered.data();
  std::vector<float> sums(N * V * nseg);
  const int64_t* sg = seg.data_ptr<int64_t>();
  for (int64_t nv = 0; nv < N * V; ++nv)
    for (int64_t s = 0; s < nseg; ++s)  // once per call: exact enough and cheap
      sums[nv * nseg + s] = static_cast<float>(
          segment_sum(xv + nv * P + sg[s] * 8, (sg[s + 1] - sg[s]) * 8, impl));
  Part p{nullptr, sums.data(), planes.data_ptr<uint8_t>(), terms.data_ptr<int64_t>(),
               cptr.data_ptr<int64_t>(), cidx.data_ptr<int64_t>(), fac.data_ptr<float>(),
               coef.data_ptr(), coef.scalar_type() == at::kHalf, sg, N, V, P, rows,
               planes.size(2), planes.size(1), terms.size(0), nseg};
  p.C = coef.size(0);
  if (tcoef) {
    check(tcoef->scalar_type() == coef.scalar_type() && tcoef->is_contiguous() &&
              tcoef->numel() == (rows + TILE - 1) / TILE * TILE * nseg * p.C,
          "tcoef: coef tile by tile (tile_major)");
    p.tcoef = tcoef->data_ptr();
  }
  const int64_t tiles = (rows + TILE - 1) / TILE, ntab = N * V * (P / 4) * 16;
  // at least ~256k weight-terms per task: small layers stay on one thread
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, P * p.T * N));
  // passes over byte columns whose tables (128 B per byte, input and version) fit in ~384 KiB
  const int64_t chunk = std::max<int64_t>(16, 3072 / (N * V));
  auto run = [impl, out](const Part& q, int64_t i0, int64_t i1) {
#ifdef __AVX512F__
    if (impl == 0 && tiles_avx512(q, out, i0, i1)) return;
#endif
    tiles_generic(q, out, i0, i1);
  };
  if (p.PB <= chunk) {  // one pass: each task builds its own tables, read from its own cache
    p.bh = p.PB;
    at::parallel_for(0, tiles, grain, [&](int64_t i0, int64_t i1) {
      const std::unique_ptr<float[]> tab(new float[ntab]);  // every entry written: no zeroing
      build_tables(xv, N * V, P, tab.get());
      Part q = p;
      q.tab = tab.get();
      run(q, i0, i1);
    });
    return;
  }
  const std::unique_ptr<float[]> tab(new float[ntab]);
  build_tables(xv, N * V, P, tab.get());
  p.tab = tab.get();
  for (p.bl = 0; p.bl < p.PB; p.bl += chunk) {
    p.bh = std::min(p.PB, p.bl + chunk);
    at::parallel_for(0, tiles, grain, [&](int64_t i0, int64_t i1) { run(p, i0, i1); });
  }
}

at::Tensor tile_major(const at::Tensor& coef) {
  const int64_t C = coef.size(0), nseg = coef.size(1), rows = coef.size(2);
  const int64_t tiles = (rows + TILE - 1) / TILE;
  at::Tensor padded = at::zeros({C, nseg, tiles * TILE}, coef.options());
  padded.narrow(2, 0, rows).copy_(coef);
  return padded.view({C, nseg, tiles, TILE}).permute({2, 1, 0, 3}).contiguous();
}

void bitpart(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& scale,
             const at::Tensor& planes, const at::Tensor& terms, const at::Tensor& cptr,
             const at::Tensor& cidx, const at::Tensor& fac, const at::Tensor& coef,
             const at::Tensor& seg, at::Tensor y, int64_t impl, bool in_order) {
  check(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x (N, cols) f32");
  check_bitpart(perm, scale, planes, terms, cptr, cidx, fac, coef, seg);
  check(y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 2 &&
            y.size(0) == x.size(0) && y.size(1) == coef.size(2), "y (N, rows) f32");
  bitpart_rows(x.data_ptr<float>(), x.size(0), x.size(1), perm, scale, planes, terms, cptr, cidx,
               fac, coef, seg, in_order, y.data_ptr<float>(), impl);
}

}  // namespace binllm_cpu
