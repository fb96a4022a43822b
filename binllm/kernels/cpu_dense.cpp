// A dense bf16 weight's product with one token: binllm/runtime/decode.py's plain bf16 linears at
// decode (a dense model's layers, and an output layer kept in bf16, as a tied embedding table).
//
// dense_gemv(x, weight, bias, impl) -> y: y = x Wᵀ + b for x (..., cols) holding one token,
//   W (rows, cols) contiguous and b (rows,) or none, all bf16: per row the products summed in
//   fp32 (with AVX512-BF16, its dot product of bf16 pairs, which reads denormal inputs as zero;
//   else the bf16 values widened exactly and fused multiply-adds), b added in fp32, rounded once
//   to bf16. Rows are split over torch's threads.
//   Why: torch's bf16 GEMV reads a wide table at about half of what one core streams (SmolLM2's
//   49,152 × 576 head: 3.6 ms a token for its 56.6 MB against 1.8 ms for a sum over them), and
//   at batch 1 that read is the whole cost.
// Returns an undefined tensor (None in Python: the caller runs torch's linear) where it does not
// compute: built without AVX-512 or impl other than 0 (a portable loop would be slower than
// torch's), not every tensor bf16 on the CPU, more than one token, W not contiguous, or a
// gradient wanted; a shape that does not fit raises its check's error.
#include "cpu_kernels.h"

#include <ATen/core/grad_mode.h>

namespace binllm_cpu {
namespace {

constexpr int64_t BLOCK = 16;  // rows whose sums are rounded to bf16 together

#ifdef __AVX512F__
constexpr int64_t NR = 2;      // rows a step (their sums in separate registers)
constexpr int64_t AHEAD = 8;   // rows ahead whose lines are prefetched

// y[r] (fp32) = W[r] · x for rows [r0, r1) of W (rows, cols), NR rows at a time, 32 (with
// AVX512-BF16) or 16 columns a step. Only a row's last step is a masked load (masked 16-bit
// loads stream at about half the rate of plain ones on AMD Zen 4), and the lines AHEAD rows on
// are prefetched (a scratch loop over SmolLM2's head: 1.0 ms with, 1.9 ms without) with the
// non-temporal hint: a table read once a token evicts less of what the next token's layers read
// again (a q1_0 SmolLM2 token 3.57-3.84 ms best against 3.95-4.29 with T0, alternating runs).
void rows_avx512(const uint16_t* x, const uint16_t* W, int64_t cols, int64_t r0, int64_t r1,
                 float* y) {
#ifdef __AVX512BF16__
  constexpr int64_t STEP = 32;
#else
  constexpr int64_t STEP = 16;
#endif
  const int64_t full = cols / STEP * STEP, left = cols - full;
  const int64_t lines = (NR * cols * 2 + 63) / 64;
  for (int64_t r = r0; r < r1; r += NR) {
    const int64_t nr = std::min(NR, r1 - r);
    const uint16_t* w[NR];
    for (int64_t j = 0; j < NR; ++j) w[j] = W + (r + std::min(j, nr - 1)) * cols;
    // formed as an integer: near the table's end the address lies past it, which a prefetch
    // never faults on and a pointer may not point to
    const auto next = reinterpret_cast<std::uintptr_t>(W) +
                      static_cast<std::uintptr_t>((r + AHEAD) * cols * 2);
    for (int64_t l = 0; l < lines; ++l)
      _mm_prefetch(reinterpret_cast<const char*>(next + 64 * l), _MM_HINT_NTA);
    __m512 acc[NR];
    for (int64_t j = 0; j < NR; ++j) acc[j] = _mm512_setzero_ps();
#ifdef __AVX512BF16__
    for (int64_t k = 0; k < full; k += STEP) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
      for (int64_t j = 0; j < NR; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(w[j] + k), xv);
    }
    if (left) {
      const __mmask32 m = (__mmask32(1) << left) - 1;
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + full);
      for (int64_t j = 0; j < NR; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_maskz_loadu_epi16(m, w[j] + full), xv);
    }
#else
    const auto load16 = [](const uint16_t* p) {
      return bf16_float16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    };
    for (int64_t k = 0; k < full; k += STEP) {
      const __m512 xv = load16(x + k);
      for (int64_t j = 0; j < NR; ++j) acc[j] = _mm512_fmadd_ps(load16(w[j] + k), xv, acc[j]);
    }
    if (left) {
      const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
      const __m512 xv = bf16_float16(_mm256_maskz_loadu_epi16(m, x + full));
      for (int64_t j = 0; j < NR; ++j)
        acc[j] = _mm512_fmadd_ps(bf16_float16(_mm256_maskz_loadu_epi16(m, w[j] + full)), xv,
                                 acc[j]);
    }
#endif
    for (int64_t j = 0; j < nr; ++j) y[r - r0 + j] = _mm512_reduce_add_ps(acc[j]);
  }
}
#endif

}  // namespace

at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, int64_t impl) {
#ifndef __AVX512F__
  return at::Tensor();
#else
  const bool has_bias = bias.has_value() && bias->defined();
  const auto bf16_cpu = [](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kBFloat16;
  };
  if (impl != 0 || !bf16_cpu(x) || !bf16_cpu(weight) || (has_bias && !bf16_cpu(*bias)) ||
      !weight.is_contiguous() || weight.dim() != 2 || x.dim() == 0 ||
      x.numel() != x.size(-1) || (at::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || (has_bias && bias->requires_grad()))))
    return at::Tensor();
  const int64_t rows = weight.size(0), cols = weight.size(1);
  check(x.size(-1) == cols, "dense_gemv: x's last dimension is not the weight's columns");
  check(!has_bias || (bias->dim() == 1 && bias->size(0) == rows),
        "dense_gemv: the bias is not (rows,)");
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = rows;
  at::Tensor y = at::empty(shape, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* W = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const auto* b = has_bias ? reinterpret_cast<const uint16_t*>(bc.data_ptr<at::BFloat16>())
                           : nullptr;
  auto* out = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t blocks = (rows + BLOCK - 1) / BLOCK;
  at::parallel_for(0, blocks, 64, [&](int64_t lo, int64_t hi) {
    float s[BLOCK];
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t r0 = i * BLOCK, n = std::min(BLOCK, rows - r0);
      rows_avx512(xp, W, cols, r0, r0 + n, s);
      if (n == BLOCK) {  // sixteen sums, the bias and c10's rounding at once (the same bits)
        __m512 v = _mm512_loadu_ps(s);
        if (b) v = _mm512_add_ps(v, bf16_float16(_mm256_loadu_si256(
                                        reinterpret_cast<const __m256i*>(b + r0))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r0), bf16_bits16(v));
        continue;
      }
      for (int64_t j = 0; j < n; ++j) {
        if (b) s[j] += bf16_float(b[r0 + j]);
        out[r0 + j] = bf16_bits(s[j]);
      }
    }
  });
  return y;
#endif
}

}  // namespace binllm_cpu
