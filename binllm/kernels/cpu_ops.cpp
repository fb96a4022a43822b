// The decode forward of a whole kernel form, the Decoder class, and the registration of
// every op as torch.ops.binllm_cpu (the other .cpp files hold the loops: cpu_kernels.h).
//
// form_gemv(x, rows, parts, sparse, groupsize, bias, dtype, impl, in_order) -> y: a whole
//   KernelForm at decode: x (..., cols) fp32, bf16 or fp16 (any N; read in fp32, exactly),
//   parts 9 tensors per BitPart (bitpart's perm ... seg, scale (0,) for none), in_order one
//   flag per BitPart (BitPart.in_order), sparse none or sparse's 6 (rowptr ... sub); per
//   SMALL_BATCH inputs the parts then the sparse part add into one fp32 sum from 0 (bitpart's
//   and sparse's loops: cpu.py's _compiled), rounded once to dtype and, with a bias (rows,) of
//   dtype, + bias rounded again: y (..., rows) of dtype equals form_matmul(x).to(dtype) + bias
//   bit for bit.
// Decoder (cpu_kernels.h; a Python class): form_gemv of one form's stages, the form checked once
//   when it is built, each call straight from Python (binllm/kernels/cpu.py) or from the
//   decoder layers of cpu_layers.cpp; None (undefined in C++) for an input it does not compute.
// rms_norm, decode_attention (Python functions, cpu_decode.cpp): the lean decode loop's glue,
//   bound with pybind11 rather than registered as ops, for the lower per-call overhead
//   (binllm/kernels/decode_ops.py).
// has_avx512() -> bool: whether the loops were compiled with AVX-512.
#include "cpu_kernels.h"

#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>

namespace py = pybind11;

namespace binllm_cpu {
void bind_layers(py::module_& m);  // cpu_layers.cpp: the DecodeLayers class

namespace {

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
  int64_t i = 0;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, at::BFloat16>) {  // no bias: sixteen roundings at a time
    for (; !bias && i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                          bf16_bits16(_mm512_loadu_ps(acc + i)));
  }
#endif
  for (; i < n; ++i) {
    const T v = static_cast<T>(acc[i]);
    out[i] = bias ? static_cast<T>(static_cast<float>(v) + static_cast<float>(bias[i % rows])) : v;
  }
}

// the checks of one form's tensors as form_gemv takes them (x's width not included); a part
// flagged in order has perm 0 .. K - 1, then only padding (-1)
void check_form(int64_t rows, at::TensorList parts, at::TensorList sparse, int64_t groupsize,
                at::IntArrayRef in_order) {
  check(parts.size() % BITPART_ARGS == 0 &&
            (sparse.empty() || static_cast<int64_t>(sparse.size()) == SPARSE_ARGS) &&
            in_order.size() * BITPART_ARGS == parts.size(),
        "parts: 9 tensors per BitPart, in_order: one flag per BitPart, sparse: none or 6");
  for (size_t i = 0; i < parts.size(); i += BITPART_ARGS) {
    const at::Tensor* a = parts.data() + i;
    check_bitpart(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]);
    check(a[7].size(2) == rows, "a part's rows are not y's");
    if (in_order[i / BITPART_ARGS]) {
      const int64_t* pp = a[0].data_ptr<int64_t>();
      int64_t K = a[0].size(0);
      while (K > 0 && pp[K - 1] < 0) --K;  // the padding
      for (int64_t j = 0; j < K; ++j) check(pp[j] == j, "a part's perm is not in order");
    }
  }
  if (!sparse.empty()) {
    check_sparse(sparse[0], sparse[1], sparse[2], sparse[3], sparse[4], sparse[5], groupsize);
    check(sparse[0].size(0) == rows + 1, "the sparse part's rows are not y's");
  }
}

// form_gemv after its checks: x (..., cols) fp32, bf16 or fp16, bias (rows,) of dtype or null
at::Tensor gemv_checked(const at::Tensor& x, int64_t rows, at::TensorList parts,
                        at::TensorList sparse, int64_t groupsize, at::IntArrayRef in_order,
                        const at::Tensor* b, at::ScalarType dtype, int64_t impl,
                        const std::vector<at::Tensor>* tcoefs = nullptr) {
  const int64_t cols = x.size(-1), N = cols ? x.numel() / cols : 0;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = rows;
  at::Tensor y = at::empty(shape, x.options().dtype(dtype));
  const at::Tensor xc = x.contiguous();
  std::vector<float> xf;
  const std::unique_ptr<float[]> acc(new float[std::min(N, SMALL_BATCH) * rows]);
  for (int64_t n0 = 0; n0 < N; n0 += SMALL_BATCH) {  // the sums of cpu.py's _compiled
    const int64_t n = std::min(SMALL_BATCH, N - n0);
    const float* xp = x.scalar_type() == at::kFloat ? xc.data_ptr<float>() + n0 * cols :
        x.scalar_type() == at::kBFloat16 ? to_float(xc.data_ptr<at::BFloat16>() + n0 * cols,
                                                    n * cols, xf) :
        to_float(xc.data_ptr<at::Half>() + n0 * cols, n * cols, xf);
    std::fill_n(acc.get(), n * rows, 0.f);
    for (size_t i = 0; i < parts.size(); i += BITPART_ARGS) {
      const at::Tensor* a = parts.data() + i;
      bitpart_rows(xp, n, cols, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8],
                   in_order[i / BITPART_ARGS] != 0, acc.get(), impl,
                   tcoefs ? &(*tcoefs)[i / BITPART_ARGS] : nullptr);
    }
    if (!sparse.empty())
      sparse_rows(xp, n, cols, sparse[0], sparse[1], sparse[2], sparse[3], sparse[4], sparse[5],
                  groupsize, acc.get(), impl);
    const int64_t first = n0 * rows, count = n * rows;  // y's entries of these inputs
    switch (dtype) {
      case at::kFloat:
        store(acc.get(), count, rows, b ? b->data_ptr<float>() : nullptr,
              y.data_ptr<float>() + first);
        break;
      case at::kBFloat16:
        store(acc.get(), count, rows, b ? b->data_ptr<at::BFloat16>() : nullptr,
              y.data_ptr<at::BFloat16>() + first);
        break;
      default:
        store(acc.get(), count, rows, b ? b->data_ptr<at::Half>() : nullptr,
              y.data_ptr<at::Half>() + first);
    }
  }
  return y;
}

at::Tensor form_gemv(const at::Tensor& x, int64_t rows, at::TensorList parts,
                     at::TensorList sparse, int64_t groupsize,
                     const std::optional<at::Tensor>& bias, at::ScalarType dtype, int64_t impl,
                     at::IntArrayRef in_order) {
  check(x.dim() >= 1 && float_type(x.scalar_type()) && float_type(dtype),
        "x (..., cols) and y fp32, bf16 or fp16");
  check_form(rows, parts, sparse, groupsize, in_order);
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  check(!b || (b->scalar_type() == dtype && b->dim() == 1 && b->size(0) == rows &&
               b->is_contiguous()), "bias (rows,) in y's dtype");
  return gemv_checked(x, rows, parts, sparse, groupsize, in_order, b, dtype, impl);
}

}  // namespace

namespace {

bool has_avx512() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

}  // namespace

// -- Decoder (cpu_kernels.h): form_gemv of one form's stages, checked once ------------------
Decoder::Decoder(Stages stages, int64_t cols, int64_t max_numel, int64_t impl)
    : cols_(cols), max_numel_(max_numel), impl_(impl) {
  check(!stages.empty(), "a form has at least one stage");
  int64_t width = cols;
  for (auto& [rows, parts, sparse, groupsize, in_order] : stages) {
    check_form(rows, parts, sparse, groupsize, in_order);
    for (size_t i = 0; i < parts.size(); i += BITPART_ARGS) {
      const at::Tensor& perm = parts[i];
      check(perm.numel() == 0 || perm.max().item<int64_t>() < width, "perm outside x");
    }
    std::vector<at::Tensor> tcoefs;  // read by the AVX-512 loops alone
    for (size_t i = 0; impl_ == 0 && has_avx512() && i < parts.size(); i += BITPART_ARGS)
      tcoefs.push_back(tile_major(parts[i + 7]));
    stages_.push_back({rows, std::move(parts), std::move(sparse), groupsize,
                       std::move(in_order), std::move(tcoefs)});
    width = rows;
  }
}

int64_t Decoder::nbytes() const {
  int64_t n = 0;
  for (const Stage& s : stages_)
    for (const at::Tensor& t : s.tcoefs) n += t.numel() * t.element_size();
  return n;
}

at::Tensor Decoder::forward(const at::Tensor& x, const at::Tensor* b) const {
  if (!x.device().is_cpu() || !float_type(x.scalar_type()) || x.dim() < 1 ||
      x.size(-1) != cols_ || x.numel() > max_numel_ || x.is_sparse() ||
      (at::GradMode::is_enabled() && (x.requires_grad() || (b && b->requires_grad()))))
    return at::Tensor();  // another device or dtype, a prefill, a backward: the registry's path
  const Stage& last = stages_.back();
  at::Tensor cast;
  if (b) {
    if (!b->device().is_cpu() || b->dim() != 1 || b->size(0) != last.rows) return at::Tensor();
    if (b->scalar_type() != x.scalar_type() || !b->is_contiguous()) {
      cast = b->to(x.scalar_type()).contiguous();
      b = &cast;
    }
  }
  at::Tensor t = x;
  for (size_t i = 0; i + 1 < stages_.size(); ++i) {
    const Stage& s = stages_[i];
    t = gemv_checked(t, s.rows, s.parts, s.sparse, s.groupsize, s.in_order, nullptr, at::kFloat,
                     impl_, s.tcoefs.empty() ? nullptr : &s.tcoefs);
  }
  return gemv_checked(t, last.rows, last.parts, last.sparse, last.groupsize, last.in_order, b,
                      x.scalar_type(), impl_, last.tcoefs.empty() ? nullptr : &last.tcoefs);
}

}  // namespace binllm_cpu

TORCH_LIBRARY(binllm_cpu, m) {
  m.def("bitpart(Tensor x, Tensor perm, Tensor scale, Tensor planes, Tensor terms, Tensor cptr, "
        "Tensor cidx, Tensor fac, Tensor coef, Tensor seg, Tensor(a!) y, int impl, "
        "bool in_order) -> ()");
  m.def("bitpart_dense(Tensor planes, Tensor terms, Tensor cptr, Tensor cidx, Tensor fac, "
        "Tensor coef, Tensor seg, int v, int r0, Tensor(a!) out) -> ()");
  m.def("bitpart_dense_bf16(Tensor planes, Tensor terms, Tensor cptr, Tensor cidx, Tensor fac, "
        "Tensor coef, Tensor seg, Tensor scale, int r0, Tensor(a!) out, int impl) -> ()");
  m.def("columns_bf16(Tensor x, Tensor perm, Tensor(a!) out) -> ()");
  m.def("smoothing_bf16(Tensor src, Tensor(a!) c) -> ()");
  m.def("rows_int8(Tensor src, Tensor colscale, Tensor(a!) q, Tensor(b!) scale) -> ()");
  m.def("scale_int32(Tensor acc, Tensor sx, Tensor sw, Tensor(a!) y) -> ()");
  m.def("sparse(Tensor x, Tensor rowptr, Tensor col, Tensor q, Tensor scale, Tensor zero, "
        "Tensor sub, int groupsize, Tensor(a!) y, int impl) -> ()");
  m.def("form_gemv(Tensor x, int rows, Tensor[] parts, Tensor[] sparse, int groupsize, "
        "Tensor? bias, ScalarType dtype, int impl, int[] in_order) -> Tensor");
  m.def("uniform8_gemv(Tensor x, Tensor q, Tensor scale, Tensor zero, int groupsize, int impl) "
        "-> Tensor");
  m.def("uniform8_dense_bf16(Tensor q, Tensor scale, Tensor zero, int groupsize, int r0, "
        "Tensor(a!) out, int impl) -> ()");
  m.def("has_avx512() -> bool", binllm_cpu::has_avx512);
}

TORCH_LIBRARY_IMPL(binllm_cpu, CPU, m) {
  m.impl("bitpart", binllm_cpu::bitpart);
  m.impl("bitpart_dense", binllm_cpu::bitpart_dense);
  m.impl("bitpart_dense_bf16", binllm_cpu::bitpart_dense_bf16);
  m.impl("columns_bf16", binllm_cpu::columns_bf16);
  m.impl("smoothing_bf16", binllm_cpu::smoothing_bf16);
  m.impl("rows_int8", binllm_cpu::rows_int8);
  m.impl("scale_int32", binllm_cpu::scale_int32);
  m.impl("sparse", binllm_cpu::sparse);
  m.impl("form_gemv", binllm_cpu::form_gemv);
  m.impl("uniform8_gemv", binllm_cpu::uniform8_gemv);
  m.impl("uniform8_dense_bf16", binllm_cpu::uniform8_dense_bf16);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using binllm_cpu::Decoder;
  py::class_<Decoder>(m, "Decoder", py::dynamic_attr())
      .def(py::init<Decoder::Stages, int64_t, int64_t, int64_t>())
      .def("__call__",
           [](const Decoder& d, const at::Tensor& x,
              const std::optional<at::Tensor>& bias) -> py::object {
             const at::Tensor y = d.forward(x, bias && bias->defined() ? &*bias : nullptr);
             return y.defined() ? py::cast(y) : py::none();
           },
           py::arg("x"), py::arg("bias") = py::none())
      .def_property_readonly("nbytes", &Decoder::nbytes);
  binllm_cpu::bind_layers(m);
  m.def("rms_norm", &binllm_cpu::rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("impl") = 0);
  m.def("decode_attention", &binllm_cpu::decode_attention, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("pos"), py::arg("scale"), py::arg("impl") = 0);
  m.def("dense_gemv", &binllm_cpu::dense_gemv, py::arg("x"), py::arg("weight"),
        py::arg("bias") = py::none(), py::arg("impl") = 0);
}
