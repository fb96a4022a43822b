// The prefill rebuilds: a BitPart's rows written out (fp32 for an fp32 GEMM, bf16 for a bf16
// GEMM) and x's columns gathered in bf16, the operands of cpu.py's chunked GEMMs.
//
// bitpart_dense(planes, terms, cptr, cidx, fac, coef, seg, v, r0, out):
//   out (n, P) = rows [r0, r0 + n) of the part's weight for x version v (the fp32 prefill).
// bitpart_dense_bf16(planes, terms, cptr, cidx, fac, coef, seg, scale, r0, out, impl):
//   out (n, P) bf16 = rows [r0, r0 + n) of the part's whole weight, sum_v scale[v, j] * W_v[r, j]
//   (scale empty: V = 1), summed in fp32 and rounded once to bf16, round to nearest even as
//   torch rounds (the prefill path of bf16 inputs); out may be a column slice of a wider
//   buffer (row stride >= P), so that several parts fill one GEMM operand side by side.
//   Per row and segment a version's constant terms are summed once; impl 0: AVX-512 (one
//   plane term, one version, no scales: a blend of the row's two bf16 values by the bits,
//   32 columns a step, and 16 rows of a plane tile at once where the CPU has AVX512-VBMI: one
//   64-byte load and one byte permutation give the 16 rows' masks of 32 columns; otherwise
//   32 then 16 columns per step, one masked add per plane term), 1: portable (8 columns of a
//   byte). All write the same bits.
// columns_bf16(x, perm, out): out[n, j] = x[n, perm[j]] (0 where perm[j] < 0), x (N, cols) bf16,
//   out (N, P) bf16 (row stride >= P): a part's x columns, the other operand of that GEMM.
// The rebuilds read only the packed planes and the part's coefficients; rows are split over
// torch's intra-op threads.
#include <array>

#include "cpu_kernels.h"

namespace binllm_cpu {

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

#if defined(__AVX512F__) && defined(__AVX512VBMI__)
// The two-valued rebuild of TILE rows [r, r + TILE) at once (one plane term, or an AND of two;
// one x version; no column scales), out rows w (row stride ld): per segment the tile's
// coefficients in one call, and per 32 columns one 64-byte load of the tile's bytes (byte
// column b of row q at 16 b + q), one byte permutation that gathers each row's 4 bytes into
// its 32-bit mask, and per row a blend of its two bf16 values. The same values as the row
// loop: base and base + c summed in the same order, rounded as bf16_bits rounds.
// dst byte 4 q + k = src byte 16 k + q: row q's bytes of 4 byte columns, in column order
constexpr std::array<uint8_t, 64> tile_order() {
  std::array<uint8_t, 64> order{};
  for (int q = 0; q < TILE; ++q)
    for (int k = 0; k < 4; ++k) order[4 * q + k] = static_cast<uint8_t>(16 * k + q);
  return order;
}
alignas(64) constexpr std::array<uint8_t, 64> kTileOrder = tile_order();

static void dense_tile_two_valued(const Part& p, const std::vector<int64_t>& cst, int64_t t,
                                  int64_t r, uint16_t* w, int64_t ld) {
  alignas(64) uint32_t m[TILE];
  float base[TILE], c[TILE], ct[TILE];
  uint16_t lo[TILE], hi[TILE];
  const int64_t* tt = p.terms + 3 * t;
  const uint8_t* t0 = p.tile(r / TILE, tt[0]);
  const uint8_t* t1 = tt[1] >= 0 ? p.tile(r / TILE, tt[1]) : nullptr;
  const __m512i idx = _mm512_load_si512(kTileOrder.data());
  for (int64_t s = 0; s < p.nseg; ++s) {
    for (int q = 0; q < TILE; ++q) base[q] = 0.f;
    for (const int64_t k : cst) {
      p.coefs(k, s, r, TILE, ct);
      for (int q = 0; q < TILE; ++q) base[q] += ct[q];
    }
    p.coefs(t, s, r, TILE, c);
    for (int q = 0; q < TILE; ++q) {
      lo[q] = bf16_bits(0.f + base[q]);
      hi[q] = bf16_bits(0.f + (base[q] + c[q]));
    }
    for (int64_t bb = p.seg[s]; bb < p.seg[s + 1]; bb += 4) {
      const int64_t nb = std::min<int64_t>(4, p.seg[s + 1] - bb);
      const __mmask64 ld_mask = nb == 4 ? ~0ULL : (1ULL << (16 * nb)) - 1ULL;
      __m512i bytes = _mm512_maskz_loadu_epi8(ld_mask, t0 + bb * TILE);
      if (t1) bytes = _mm512_and_si512(bytes, _mm512_maskz_loadu_epi8(ld_mask, t1 + bb * TILE));
      _mm512_store_si512(m, _mm512_permutexvar_epi8(idx, bytes));
      const __mmask32 lim = nb == 4 ? 0xFFFFFFFFu : (1u << (8 * nb)) - 1u;
      for (int q = 0; q < TILE; ++q)
        _mm512_mask_storeu_epi16(w + q * ld + 8 * bb, lim, _mm512_mask_blend_epi16(
            m[q], _mm512_set1_epi16(static_cast<int16_t>(lo[q])),
            _mm512_set1_epi16(static_cast<int16_t>(hi[q]))));
    }
  }
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
  // chunks of whole tiles where the rows allow, so that the tile path takes them
  const int64_t grain = (std::max<int64_t>(8, 65536 / std::max<int64_t>(1, P * T)) + TILE - 1) /
                        TILE * TILE;
  at::parallel_for(0, n, grain, [&](int64_t a, int64_t b) {
    std::vector<float> base(V), c(live.size());  // of the current row and segment
    for (int64_t i = a; i < b; ++i) {
      const int64_t r = r0 + i;
#if defined(__AVX512F__) && defined(__AVX512VBMI__)
      if (impl == 0 && two_valued && r % TILE == 0 && i + TILE <= b) {
        dense_tile_two_valued(p, cst, live[0], r, o + i * ld, ld);
        i += TILE - 1;
        continue;
      }
#endif
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

}  // namespace binllm_cpu
