// The lookups of a BitPart's row tiles (cpu_gemv.cpp's bitpart_rows builds the tables and
// splits the tiles over threads), as cpu_gemv.cpp's header describes the GEMV:
//
// tiles_generic(p, y, i0, i1): y[rows of tiles i0 .. i1) += the part's product, portable loops.
// tiles_avx512(p, y, i0, i1): the same with AVX-512 (16 rows of a tile in the 16 lanes: one
//   byte load per row, two permutes of a 16-entry table; four partial sums for one or two
//   inputs, two for 3 to 8); false (nothing done) for more than 8 inputs. With one input
//   (decode) four whole tiles run together: a byte column's two table vectors are loaded once
//   for the four, and each tile's sums are added exactly as alone, so a tile's result does not
//   depend on how the tiles are split over threads.
#include "cpu_kernels.h"

namespace binllm_cpu {

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
namespace {

inline __m512i bytes16(const uint8_t* b) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
}

// acc[k N + n]: the sum over the segment's bytes [b0, b1) of term tm's table lookups for the
// 16 rows of tile i + k and input n, k < TB. Each tile and input has its own partial sums (four
// for one or two inputs, so that the adds' latency is hidden; two for 3 to 8), added in the
// same order whatever TB is, so a tile's result does not depend on the tiles beside it (a
// byte column's table vectors are the same loads for every tile: the compiler loads them once).
template <int N, int TB, bool AND>
inline void lookups(const Part& p, int64_t i, const int64_t* tm, int64_t b0, int64_t b1,
                    __m512* acc) {
  const float* tb[N];
  for (int n = 0; n < N; ++n) tb[n] = p.table(n, tm[2]);
  const uint8_t *q1[TB], *q2[TB];
  for (int k = 0; k < TB; ++k) {
    q1[k] = p.tile(i + k, tm[0]);
    q2[k] = AND ? p.tile(i + k, tm[1]) : nullptr;
  }
  __m512 a1[TB][N], a2[TB][N];
  for (int k = 0; k < TB; ++k)
    for (int n = 0; n < N; ++n) a1[k][n] = a2[k][n] = _mm512_setzero_ps();
  int64_t b = b0;
  if constexpr (N <= 2) {
    __m512 a3[TB][N], a4[TB][N];
    for (int k = 0; k < TB; ++k)
      for (int n = 0; n < N; ++n) a3[k][n] = a4[k][n] = _mm512_setzero_ps();
    for (; b + 2 <= b1; b += 2) {
      for (int k = 0; k < TB; ++k) {
        __m512i lo = bytes16(q1[k] + b * TILE), lo2 = bytes16(q1[k] + (b + 1) * TILE);
        if (AND) {
          lo = _mm512_and_si512(lo, bytes16(q2[k] + b * TILE));
          lo2 = _mm512_and_si512(lo2, bytes16(q2[k] + (b + 1) * TILE));
        }
        const __m512i hi = _mm512_srli_epi32(lo, 4), hi2 = _mm512_srli_epi32(lo2, 4);
        for (int n = 0; n < N; ++n) {  // the same table loads for every k: loaded once
          const float* t = tb[n] + 32 * b;
          a1[k][n] = _mm512_add_ps(a1[k][n], _mm512_permutexvar_ps(lo, _mm512_loadu_ps(t)));
          a2[k][n] = _mm512_add_ps(a2[k][n], _mm512_permutexvar_ps(hi, _mm512_loadu_ps(t + 16)));
          a3[k][n] = _mm512_add_ps(a3[k][n], _mm512_permutexvar_ps(lo2, _mm512_loadu_ps(t + 32)));
          a4[k][n] = _mm512_add_ps(a4[k][n], _mm512_permutexvar_ps(hi2, _mm512_loadu_ps(t + 48)));
        }
      }
    }
    for (int k = 0; k < TB; ++k)
      for (int n = 0; n < N; ++n) {
        a1[k][n] = _mm512_add_ps(a1[k][n], a3[k][n]);
        a2[k][n] = _mm512_add_ps(a2[k][n], a4[k][n]);
      }
  }
  for (; b < b1; ++b) {
    for (int k = 0; k < TB; ++k) {
      __m512i lo = bytes16(q1[k] + b * TILE);
      if (AND) lo = _mm512_and_si512(lo, bytes16(q2[k] + b * TILE));
      const __m512i hi = _mm512_srli_epi32(lo, 4);  // permutexvar reads index bits 3:0 only
      for (int n = 0; n < N; ++n) {
        const float* t = tb[n] + 32 * b;
        a1[k][n] = _mm512_add_ps(a1[k][n], _mm512_permutexvar_ps(lo, _mm512_loadu_ps(t)));
        a2[k][n] = _mm512_add_ps(a2[k][n], _mm512_permutexvar_ps(hi, _mm512_loadu_ps(t + 16)));
      }
    }
  }
  for (int k = 0; k < TB; ++k)
    for (int n = 0; n < N; ++n) acc[k * N + n] = _mm512_add_ps(a1[k][n], a2[k][n]);
}

// C_t[s, r .. r + 16) (lanes outside m: 0)
inline __m512 coef16(const Part& p, int64_t t, int64_t s, int64_t r, __mmask16 m) {
  __m512 c = _mm512_setzero_ps();
  const void* coef = p.tcoef ? p.tcoef : p.coef;
  for (int64_t k = p.cptr[t]; k < p.cptr[t + 1]; ++k) {
    const int64_t at = p.tcoef ? ((r / TILE * p.nseg + s) * p.C + p.cidx[k]) * TILE
                               : (p.cidx[k] * p.nseg + s) * p.rows + r;
    const __m512 a = p.half ?
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(coef) + at)) :
        _mm512_maskz_loadu_ps(m, static_cast<const float*>(coef) + at);
    c = _mm512_fmadd_ps(_mm512_set1_ps(p.fac[k]), a, c);
  }
  return c;
}

// the lines tiles [i, i + n) read, asked for a few at a time while the tiles before them
// compute: their planes (contiguous) and their coefficients (contiguous tile by tile; without
// the tile-major copy only the planes). A part of several planes and coefficient arrays reads
// them in an order (segment by segment, term by term, tile by tile) that the hardware
// prefetchers do not follow; asked for in one burst, the lines would fill the core's miss
// buffers and stall it until they arrive.
class Ahead {
 public:
  Ahead(const Part& p, int64_t i, int64_t n, int64_t calls) {
    a_ = line(p.tile(i, 0));  // addresses as integers, from the first line touched
    e_ = n > 0 ? reinterpret_cast<uintptr_t>(p.tile(i + n, 0)) : a_;
    if (p.tcoef && n > 0) {
      const int64_t per_tile = p.nseg * p.C * TILE * (p.half ? 2 : 4);
      const uintptr_t c = reinterpret_cast<uintptr_t>(p.tcoef) + i * per_tile;
      c_ = line(reinterpret_cast<const void*>(c));
      ce_ = c + n * per_tile;
    }
    const int64_t lines = static_cast<int64_t>((e_ > a_ ? e_ - a_ : 0) + (ce_ - c_)) / 64;
    step_ = n > 0 ? lines / std::max<int64_t>(1, calls) + 1 : 0;  // n 0: nothing to ask for
  }
  void next() {  // about 1 / calls of the lines
    for (int64_t k = 0; k < step_; ++k) {
      if (a_ < e_) {
        _mm_prefetch(reinterpret_cast<const char*>(a_), _MM_HINT_T1);
        a_ += 64;
      } else if (c_ < ce_) {
        _mm_prefetch(reinterpret_cast<const char*>(c_), _MM_HINT_T1);
        c_ += 64;
      }
    }
  }

 private:
  static uintptr_t line(const void* at) { return reinterpret_cast<uintptr_t>(at) & ~uintptr_t{63}; }
  uintptr_t a_, e_, c_ = 0, ce_ = 0;
  int64_t step_;
};

// y[n, rows of tiles [i, i + TB)] += the part's product for N inputs, rows outside m of a
// single partial tile untouched (TB > 1: whole tiles, m all ones); prefetch: the next TB
// tiles' lines are asked for while these compute
template <int N, int TB>
void tiles_lut(const Part& p, float* y, int64_t i, __mmask16 m, bool prefetch) {
  Ahead ahead(p, i + TB, prefetch ? TB : 0, p.nseg * p.T);
  __m512 tot[TB * N], acc[TB * N];
  for (int q = 0; q < TB * N; ++q) tot[q] = _mm512_setzero_ps();
  for (int64_t s = 0; s < p.nseg; ++s) {
    if (p.seg[s + 1] <= p.bl || p.seg[s] >= p.bh) continue;
    const int64_t b0 = std::max(p.seg[s], p.bl), b1 = std::min(p.seg[s + 1], p.bh);
    for (int64_t t = 0; t < p.T; ++t) {
      const int64_t* tm = p.terms + 3 * t;
      if (tm[0] < 0 && p.seg[s] < p.bl) continue;  // counted in the segment's first pass
      ahead.next();
      if (tm[0] < 0) {  // constant term: the segment sum
        for (int k = 0; k < TB; ++k) {
          const __m512 c = coef16(p, t, s, (i + k) * TILE, m);
          for (int n = 0; n < N; ++n)
            tot[k * N + n] = _mm512_fmadd_ps(
                c, _mm512_set1_ps(p.sums[(n * p.V + tm[2]) * p.nseg + s]), tot[k * N + n]);
        }
        continue;
      }
      if (tm[1] >= 0)
        lookups<N, TB, true>(p, i, tm, b0, b1, acc);
      else
        lookups<N, TB, false>(p, i, tm, b0, b1, acc);
      for (int k = 0; k < TB; ++k) {
        const __m512 c = coef16(p, t, s, (i + k) * TILE, m);
        for (int n = 0; n < N; ++n)
          tot[k * N + n] = _mm512_fmadd_ps(c, acc[k * N + n], tot[k * N + n]);
      }
    }
  }
  for (int k = 0; k < TB; ++k)
    for (int n = 0; n < N; ++n) {
      float* o = y + n * p.rows + (i + k) * TILE;
      _mm512_mask_storeu_ps(o, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), tot[k * N + n]));
    }
}

template <int N>
void tiles_n(const Part& p, float* y, int64_t i0, int64_t i1) {
  int64_t i = i0;
  if constexpr (N == 1) {  // one input (decode): four whole tiles at a time
    const bool whole = p.bl == 0 && p.bh == p.PB;  // one pass: the next tiles' lines ahead
    for (; i + 4 <= i1 && (i + 4) * TILE <= p.rows; i += 4)
      tiles_lut<1, 4>(p, y, i, 0xFFFF, i + 8 <= i1 && (i + 8) * TILE <= p.rows && whole);
  }
  for (; i < i1; ++i) {
    const int64_t left = std::min<int64_t>(TILE, p.rows - i * TILE);
    tiles_lut<N, 1>(p, y, i, static_cast<__mmask16>((1u << left) - 1u), false);
  }
}

}  // namespace

bool tiles_avx512(const Part& p, float* y, int64_t i0, int64_t i1) {
  switch (p.N) {
    case 1: tiles_n<1>(p, y, i0, i1); return true;
    case 2: tiles_n<2>(p, y, i0, i1); return true;
    case 3: tiles_n<3>(p, y, i0, i1); return true;
    case 4: tiles_n<4>(p, y, i0, i1); return true;
    case 5: tiles_n<5>(p, y, i0, i1); return true;
    case 6: tiles_n<6>(p, y, i0, i1); return true;
    case 7: tiles_n<7>(p, y, i0, i1); return true;
    case 8: tiles_n<8>(p, y, i0, i1); return true;
    default: return false;
  }
}
#endif

}  // namespace binllm_cpu
