// CPU kernels of binllm's kernel form (binllm/kernels/form.py), registered as torch.ops.binllm_cpu.
//
// bitpart(x, perm, scale, planes, plane, ver, coef, cnst, seg, y, impl):
//   xv[n, v, j] = x[n, perm[j]] * scale[v, j]   (0 where perm[j] < 0; scale empty: V = 1, ones)
//   y[n, r] += sum_t sum_s coef[t, r, s] * sum_{j in s} B_{plane[t]}[r, j] * xv[n, ver[t], j]
//            + sum_v sum_s cnst[v, r, s] * sum_{j in s} xv[n, v, j]
//   x (N, cols) fp32, perm (P,) int64, scale (V, P) fp32 or (0,),
//   planes (NP, rows, P/8) uint8 (bit k of byte b = column 8b + k),
//   plane/ver (T,) int64, coef (T, rows, nseg) fp32, cnst (V, rows, nseg) fp32,
//   seg (nseg + 1,) int64 byte offsets (even: whole 16-column chunks), y (N, rows) fp32.
//   impl 0: AVX-512 masked adds where compiled with AVX-512F, 1: portable C++ loop.
// sparse(x, rowptr, col, q, scale, zero, sub, groupsize, y):
//   y[n, r] += sum_k (scale[r] * (q_k - zero[r]) - sub[r, col_k / groupsize]) * x[n, col_k]
// bitpart_dense(planes, plane, ver, coef, cnst, seg, v, r0, out):
//   out (n, P) = rows [r0, r0 + n) of the part's weight for x version v (the prefill path).
// Every loop reads only the packed planes; rows are split over torch's intra-op threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

struct Part {
  const float* xv; const uint8_t* planes; const int64_t* plane; const int64_t* ver;
  const float* coef; const float* cnst; const int64_t* seg;
  int64_t N, V, P, rows, PB, T, nseg;
};

// sums[n, v, s] = sum over segment s of xv[n, v, :]
std::vector<float> seg_sums(const Part& p) {
  std::vector<float> sums(p.N * p.V * p.nseg);
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t v = 0; v < p.V; ++v) {
      const float* x = p.xv + (n * p.V + v) * p.P;
      for (int64_t s = 0; s < p.nseg; ++s) {
        double a = 0;  // once per call: exact enough and cheap
        for (int64_t j = p.seg[s] * 8; j < p.seg[s + 1] * 8; ++j) a += x[j];
        sums[(n * p.V + v) * p.nseg + s] = static_cast<float>(a);
      }
    }
  return sums;
}

float const_term(const Part& p, const std::vector<float>& sums, int64_t n, int64_t r) {
  float c = 0.f;
  for (int64_t v = 0; v < p.V; ++v) {
    const float* k = p.cnst + (v * p.rows + r) * p.nseg;
    const float* s = sums.data() + (n * p.V + v) * p.nseg;
    for (int64_t i = 0; i < p.nseg; ++i) c += k[i] * s[i];
  }
  return c;
}

// portable: one row, every batch element
void rows_generic(const Part& p, const std::vector<float>& sums, float* y, int64_t r0,
                  int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t n = 0; n < p.N; ++n) {
      float tot = const_term(p, sums, n, r);
      for (int64_t s = 0; s < p.nseg; ++s)
        for (int64_t t = 0; t < p.T; ++t) {
          const uint8_t* bits = p.planes + (p.plane[t] * p.rows + r) * p.PB;
          const float* x = p.xv + (n * p.V + p.ver[t]) * p.P;
          float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
          for (int64_t b = p.seg[s]; b < p.seg[s + 1]; ++b) {
            const unsigned byte = bits[b];
            const float* xb = x + 8 * b;
            for (int k = 0; k < 8; ++k) acc[k] += xb[k] * static_cast<float>((byte >> k) & 1u);
          }
          float a = 0.f;
          for (int k = 0; k < 8; ++k) a += acc[k];
          tot += p.coef[(t * p.rows + r) * p.nseg + s] * a;
        }
      y[n * p.rows + r] += tot;
    }
}

#ifdef __AVX512F__
// R rows x N batch elements at once: R*N independent accumulator chains per 16 columns
template <int R, int N>
void tile_avx512(const Part& p, const std::vector<float>& sums, float* y, int64_t r) {
  __m512 tot[R][N];
  for (int i = 0; i < R; ++i)
    for (int n = 0; n < N; ++n) tot[i][n] = _mm512_setzero_ps();
  for (int64_t s = 0; s < p.nseg; ++s) {
    const int64_t b0 = p.seg[s], b1 = p.seg[s + 1];
    for (int64_t t = 0; t < p.T; ++t) {
      const uint8_t* bits[R];
      for (int i = 0; i < R; ++i) bits[i] = p.planes + (p.plane[t] * p.rows + r + i) * p.PB;
      const float* x[N];
      for (int n = 0; n < N; ++n) x[n] = p.xv + (n * p.V + p.ver[t]) * p.P;
      __m512 acc[R][N];
      for (int i = 0; i < R; ++i)
        for (int n = 0; n < N; ++n) acc[i][n] = _mm512_setzero_ps();
      int64_t b = b0;
      for (; b + 4 <= b1; b += 4) {  // 32 columns: one 32-bit mask per row
        __m512 lo[N], hi[N];
        for (int n = 0; n < N; ++n) {
          lo[n] = _mm512_loadu_ps(x[n] + 8 * b);
          hi[n] = _mm512_loadu_ps(x[n] + 8 * b + 16);
        }
        for (int i = 0; i < R; ++i) {
          uint32_t m;
          std::memcpy(&m, bits[i] + b, 4);
          const __mmask16 m0 = static_cast<__mmask16>(m), m1 = static_cast<__mmask16>(m >> 16);
          for (int n = 0; n < N; ++n) {
            acc[i][n] = _mm512_mask_add_ps(acc[i][n], m0, acc[i][n], lo[n]);
            acc[i][n] = _mm512_mask_add_ps(acc[i][n], m1, acc[i][n], hi[n]);
          }
        }
      }
      for (; b < b1; b += 2) {  // a 16-column tail
        __m512 xs[N];
        for (int n = 0; n < N; ++n) xs[n] = _mm512_loadu_ps(x[n] + 8 * b);
        for (int i = 0; i < R; ++i) {
          uint16_t m;
          std::memcpy(&m, bits[i] + b, 2);
          for (int n = 0; n < N; ++n)
            acc[i][n] = _mm512_mask_add_ps(acc[i][n], m, acc[i][n], xs[n]);
        }
      }
      for (int i = 0; i < R; ++i) {
        const __m512 c = _mm512_set1_ps(p.coef[(t * p.rows + r + i) * p.nseg + s]);
        for (int n = 0; n < N; ++n) tot[i][n] = _mm512_fmadd_ps(c, acc[i][n], tot[i][n]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int n = 0; n < N; ++n)
      y[n * p.rows + r + i] += _mm512_reduce_add_ps(tot[i][n]) + const_term(p, sums, n, r + i);
}

// N = 1 (decode): TG terms fused in one pass over each segment's chunks, R rows at once
template <int R, int TG>
void tile_fused(const Part& p, int64_t t0, int64_t r, __m512* tot) {
  for (int64_t s = 0; s < p.nseg; ++s) {
    const int64_t b0 = p.seg[s], b1 = p.seg[s + 1];
    const uint8_t* bits[TG][R];
    const float* x[TG];
    for (int t = 0; t < TG; ++t) {
      x[t] = p.xv + p.ver[t0 + t] * p.P;
      for (int i = 0; i < R; ++i) bits[t][i] = p.planes + (p.plane[t0 + t] * p.rows + r + i) * p.PB;
    }
    __m512 acc[TG][R];
    for (int t = 0; t < TG; ++t)
      for (int i = 0; i < R; ++i) acc[t][i] = _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; b += 2)
      for (int t = 0; t < TG; ++t) {
        const __m512 xs = _mm512_loadu_ps(x[t] + 8 * b);
        for (int i = 0; i < R; ++i) {
          uint16_t m;
          std::memcpy(&m, bits[t][i] + b, 2);
          acc[t][i] = _mm512_mask_add_ps(acc[t][i], m, acc[t][i], xs);
        }
      }
    for (int t = 0; t < TG; ++t)
      for (int i = 0; i < R; ++i)
        tot[i] = _mm512_fmadd_ps(_mm512_set1_ps(p.coef[((t0 + t) * p.rows + r + i) * p.nseg + s]),
                                 acc[t][i], tot[i]);
  }
}

template <int R>
void tile_decode(const Part& p, const std::vector<float>& sums, float* y, int64_t r) {
  __m512 tot[R];
  for (int i = 0; i < R; ++i) tot[i] = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 3 <= p.T; t += 3) tile_fused<R, 3>(p, t, r, tot);
  if (p.T - t == 2) tile_fused<R, 2>(p, t, r, tot);
  if (p.T - t == 1) tile_fused<R, 1>(p, t, r, tot);
  for (int i = 0; i < R; ++i)
    y[r + i] += _mm512_reduce_add_ps(tot[i]) + const_term(p, sums, 0, r + i);
}

void rows_decode(const Part& p, const std::vector<float>& sums, float* y, int64_t r0,
                 int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) tile_decode<4>(p, sums, y, r);
  for (; r < r1; ++r) tile_decode<1>(p, sums, y, r);
}

template <int R, int N>
void rows_avx512(const Part& p, const std::vector<float>& sums, float* y, int64_t r0,
                 int64_t r1) {
  int64_t r = r0;
  for (; r + R <= r1; r += R) tile_avx512<R, N>(p, sums, y, r);
  for (; r < r1; ++r) tile_avx512<1, N>(p, sums, y, r);
}

bool rows_avx512_dispatch(const Part& p, const std::vector<float>& sums, float* y, int64_t r0,
                          int64_t r1) {
  switch (p.N) {
    case 1: rows_decode(p, sums, y, r0, r1); return true;
    case 2: rows_avx512<2, 2>(p, sums, y, r0, r1); return true;
    case 3: rows_avx512<2, 3>(p, sums, y, r0, r1); return true;
    case 4: rows_avx512<1, 4>(p, sums, y, r0, r1); return true;
    case 5: rows_avx512<1, 5>(p, sums, y, r0, r1); return true;
    case 6: rows_avx512<1, 6>(p, sums, y, r0, r1); return true;
    case 7: rows_avx512<1, 7>(p, sums, y, r0, r1); return true;
    case 8: rows_avx512<1, 8>(p, sums, y, r0, r1); return true;
    default: return false;
  }
}
#endif

void check(bool ok, const char* what) { TORCH_CHECK(ok, "binllm_cpu: ", what); }

Part make_part(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& scale,
               const at::Tensor& planes, const at::Tensor& plane, const at::Tensor& ver,
               const at::Tensor& coef, const at::Tensor& cnst, const at::Tensor& seg,
               std::vector<float>& xv) {
  check(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x (N, cols) f32");
  check(perm.scalar_type() == at::kLong && perm.is_contiguous(), "perm (P,) int64");
  check(planes.dim() == 3 && planes.scalar_type() == at::kByte && planes.is_contiguous(),
        "planes (NP, rows, P/8) uint8");
  check(plane.scalar_type() == at::kLong && ver.scalar_type() == at::kLong &&
            seg.scalar_type() == at::kLong, "plane, ver, seg int64");
  check(coef.scalar_type() == at::kFloat && coef.is_contiguous() &&
            cnst.scalar_type() == at::kFloat && cnst.is_contiguous(), "coef, cnst f32");
  const int64_t N = x.size(0), cols = x.size(1), P = perm.size(0);
  const int64_t V = scale.numel() ? scale.size(0) : 1;
  check(!scale.numel() || (scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                           scale.size(1) == P), "scale (V, P) f32");
  xv.assign(N * V * P, 0.f);
  const float* xp = x.data_ptr<float>();
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
  Part p{xv.data(), planes.data_ptr<uint8_t>(), plane.data_ptr<int64_t>(),
         ver.data_ptr<int64_t>(), coef.data_ptr<float>(), cnst.data_ptr<float>(),
         seg.data_ptr<int64_t>(), N, V, P, coef.size(1), planes.size(2), plane.size(0),
         seg.size(0) - 1};
  check(p.PB * 8 == p.P && cnst.size(0) == p.V && cnst.size(1) == p.rows &&
            coef.size(2) == p.nseg && (p.T == 0 || planes.size(1) == p.rows) &&
            p.seg[p.nseg] == p.PB, "inconsistent part shapes");
  return p;
}

void bitpart(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& scale,
             const at::Tensor& planes, const at::Tensor& plane, const at::Tensor& ver,
             const at::Tensor& coef, const at::Tensor& cnst, const at::Tensor& seg, at::Tensor y,
             int64_t impl) {
  std::vector<float> xv;
  const Part p = make_part(x, perm, scale, planes, plane, ver, coef, cnst, seg, xv);
  check(y.scalar_type() == at::kFloat && y.is_contiguous() && y.size(0) == p.N &&
            y.size(1) == p.rows, "y (N, rows) f32");
  const std::vector<float> sums = seg_sums(p);
  float* out = y.data_ptr<float>();
  // at least ~64k weight-terms per task: small layers stay on one thread
  const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(1, p.P * p.T * p.N));
  at::parallel_for(0, p.rows, grain, [&](int64_t r0, int64_t r1) {
#ifdef __AVX512F__
    if (impl == 0 && rows_avx512_dispatch(p, sums, out, r0, r1)) return;
#endif
    rows_generic(p, sums, out, r0, r1);
  });
}

void bitpart_dense(const at::Tensor& planes, const at::Tensor& plane, const at::Tensor& ver,
                   const at::Tensor& coef, const at::Tensor& cnst, const at::Tensor& seg,
                   int64_t v, int64_t r0, at::Tensor out) {
  const int64_t P = planes.size(2) * 8, rows = coef.size(1), nseg = seg.size(0) - 1;
  const int64_t n = out.size(0), T = plane.size(0), PB = planes.size(2);
  check(out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(1) == P &&
            r0 >= 0 && r0 + n <= rows, "out (n, P) f32 inside the rows");
  const uint8_t* pl = planes.data_ptr<uint8_t>();
  const int64_t *pi = plane.data_ptr<int64_t>(), *vi = ver.data_ptr<int64_t>(),
                *sg = seg.data_ptr<int64_t>();
  const float *cf = coef.data_ptr<float>(), *cn = cnst.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(8, 65536 / std::max<int64_t>(1, P * T)),
                   [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t r = r0 + i;
      float* w = o + i * P;
      for (int64_t s = 0; s < nseg; ++s) {
        const float c0 = cn[(v * rows + r) * nseg + s];
        for (int64_t j = sg[s] * 8; j < sg[s + 1] * 8; ++j) w[j] = c0;
      }
      for (int64_t t = 0; t < T; ++t) {
        if (vi[t] != v) continue;
        const uint8_t* bits = pl + (pi[t] * rows + r) * PB;
        for (int64_t s = 0; s < nseg; ++s) {
          const float c = cf[(t * rows + r) * nseg + s];
          for (int64_t b = sg[s]; b < sg[s + 1]; ++b) {
            const unsigned byte = bits[b];
            float* wb = w + 8 * b;
            for (int k = 0; k < 8; ++k) wb[k] += c * static_cast<float>((byte >> k) & 1u);
          }
        }
      }
    }
  });
}

void sparse(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& col,
            const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
            const at::Tensor& sub, int64_t groupsize, at::Tensor y) {
  check(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x (N, cols) f32");
  check(rowptr.scalar_type() == at::kLong && col.scalar_type() == at::kInt &&
            q.scalar_type() == at::kByte && sub.is_contiguous() && groupsize > 0,
        "sparse part dtypes");
  const int64_t N = x.size(0), cols = x.size(1), rows = rowptr.size(0) - 1, ng = sub.size(1);
  check(y.size(0) == N && y.size(1) == rows && y.is_contiguous(), "y (N, rows) f32");
  const float *xp = x.data_ptr<float>(), *sc = scale.data_ptr<float>(),
              *ze = zero.data_ptr<float>(), *sb = sub.data_ptr<float>();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int32_t* cp = col.data_ptr<int32_t>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  const int64_t nnz = rp[rows];  // at least ~64k entries per task: small layers stay serial
  const int64_t grain = std::max<int64_t>(64, rows * 65536 / std::max<int64_t>(1, nnz * N));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t n = 0; n < N; ++n) {
        const float* xr = xp + n * cols;
        float acc = 0.f;
        for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
          const int32_t c = cp[k];
          acc += (sc[r] * (static_cast<float>(qp[k]) - ze[r]) - sb[r * ng + c / groupsize]) * xr[c];
        }
        out[n * rows + r] += acc;
      }
  });
}

bool has_avx512() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(binllm_cpu, m) {
  m.def("bitpart(Tensor x, Tensor perm, Tensor scale, Tensor planes, Tensor plane, Tensor ver, "
        "Tensor coef, Tensor cnst, Tensor seg, Tensor(a!) y, int impl) -> ()");
  m.def("bitpart_dense(Tensor planes, Tensor plane, Tensor ver, Tensor coef, Tensor cnst, "
        "Tensor seg, int v, int r0, Tensor(a!) out) -> ()");
  m.def("sparse(Tensor x, Tensor rowptr, Tensor col, Tensor q, Tensor scale, Tensor zero, "
        "Tensor sub, int groupsize, Tensor(a!) y) -> ()");
  m.def("has_avx512() -> bool", has_avx512);
}

TORCH_LIBRARY_IMPL(binllm_cpu, CPU, m) {
  m.impl("bitpart", bitpart);
  m.impl("bitpart_dense", bitpart_dense);
  m.impl("sparse", sparse);
}
