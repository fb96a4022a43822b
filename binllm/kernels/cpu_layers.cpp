// The decoder layers of a LLaMA-family model for one new token, in one compiled call: the lean
// decode loop (binllm/runtime/decode.py) without Python between the layers' ops.
//
// DecodeLayers(layers, cos, sin, scale, impl) (a Python class): layers a list of
//   (input_norm, input_eps, post_norm, post_eps, linears, k_cache, v_cache), linears seven
//   (decoder, weight, bias) in the order q, k, v, o, gate, up, down: decoder a form's Decoder
//   (cpu_kernels.h) or None with weight a dense (rows, cols) tensor; bias (rows,) or None.
//   cos and sin (max_len, hd): the rotary embedding at every position; caches
//   (1, KV, max_len, hd). Everything is checked once, here.
// layers(h, pos) -> h: h (1, 1, d) the token's hidden state at position pos, through every
//   layer: x = rms_norm(h, input_norm); o = decode_attention(q(x), k(x), v(x), cos[pos],
//   sin[pos], caches, pos); h = h + o_proj(o); x = rms_norm(h, post_norm);
//   h = h + down(silu(gate(x)) * up(x)). The same functions as the Python loop calls, in the
//   same order: rms_norm and decode_attention of cpu_decode.cpp, each packed linear's Decoder,
//   for a dense one dense_gemv (cpu_dense.cpp) where it computes it, else F.linear
//   (at::linear), and torch's own add, mul and silu, so the result equals that loop's bit for
//   bit. The rotated keys and values are written into the caches.
#include "cpu_kernels.h"

#include <ATen/ops/add.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>

namespace py = pybind11;

namespace binllm_cpu {
namespace {

constexpr int LINEARS = 7;  // q, k, v, o, gate, up, down

// one linear of a layer: a packed form's Decoder, or a dense weight (bf16: dense_gemv, which
// streams it; otherwise at::linear)
struct Linear {
  const Decoder* decoder = nullptr;
  at::Tensor weight, bias;  // weight: the dense one (decoder null); bias undefined: none
  int64_t impl = 0;

  at::Tensor operator()(const at::Tensor& x) const {
    if (decoder == nullptr) {
      const auto b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
      at::Tensor y = dense_gemv(x, weight, b, impl);
      return y.defined() ? y : at::linear(x, weight, b);
    }
    at::Tensor y = decoder->forward(x, bias.defined() ? &bias : nullptr);
    check(y.defined(), "DecodeLayers: a packed linear's decoder declined the token (it "
                       "computes CPU tensors of its width without gradients)");
    return y;
  }
};

struct Layer {
  at::Tensor input_norm, post_norm, k_cache, v_cache;
  double input_eps, post_eps;
  Linear lin[LINEARS];
};

class DecodeLayers {
 public:
  DecodeLayers(const py::list& layers, at::Tensor cos, at::Tensor sin, double scale,
               int64_t impl)
      : cos_(std::move(cos)), sin_(std::move(sin)), scale_(scale), impl_(impl) {
    check(cos_.dim() == 2 && sin_.sizes() == cos_.sizes(),
          "DecodeLayers: cos and sin (max_len, hd), of one shape");
    for (const py::handle& item : layers) {
      const py::tuple t = py::reinterpret_borrow<py::tuple>(item);
      check(t.size() == 7, "DecodeLayers: a layer is (input_norm, input_eps, post_norm, "
                           "post_eps, linears, k_cache, v_cache)");
      Layer L;
      L.input_norm = t[0].cast<at::Tensor>();
      L.input_eps = t[1].cast<double>();
      L.post_norm = t[2].cast<at::Tensor>();
      L.post_eps = t[3].cast<double>();
      const py::tuple lins = t[4].cast<py::tuple>();
      check(lins.size() == LINEARS, "DecodeLayers: seven linears, q k v o gate up down");
      for (int i = 0; i < LINEARS; ++i) {
        const py::tuple spec = lins[i].cast<py::tuple>();
        check(spec.size() == 3, "DecodeLayers: a linear is (decoder, weight, bias)");
        Linear& lin = L.lin[i];
        lin.impl = impl_;
        if (!spec[0].is_none()) {
          lin.decoder = spec[0].cast<const Decoder*>();
          owners_.push_back(py::reinterpret_borrow<py::object>(spec[0]));
        } else {
          lin.weight = spec[1].cast<at::Tensor>();
          check(lin.weight.dim() == 2, "DecodeLayers: a dense linear's weight (rows, cols)");
        }
        if (!spec[2].is_none()) lin.bias = spec[2].cast<at::Tensor>();
      }
      L.k_cache = t[5].cast<at::Tensor>();
      L.v_cache = t[6].cast<at::Tensor>();
      check(L.k_cache.dim() == 4 && L.k_cache.size(2) == cos_.size(0) &&
                L.k_cache.size(3) == cos_.size(1),
            "DecodeLayers: caches (1, KV, max_len, hd) for cos and sin (max_len, hd)");
      layers_.push_back(std::move(L));
    }
  }

  at::Tensor operator()(at::Tensor h, int64_t pos) const {
    check(h.dim() == 3 && h.size(0) == 1 && h.size(1) == 1,
          "DecodeLayers: h (1, 1, d), one token");
    TORCH_CHECK(pos >= 0 && pos < cos_.size(0), "binllm_cpu: DecodeLayers: pos ", pos,
                " outside [0, max_len) = [0, ", cos_.size(0), ")");
    const at::Tensor cos = cos_[pos], sin = sin_[pos];
    for (const Layer& L : layers_) {
      at::Tensor x = rms_norm(h, L.input_norm, L.input_eps, impl_);
      check(x.defined(), "DecodeLayers: rms_norm declined h (CPU, one float dtype, no grad)");
      const at::Tensor o = decode_attention(L.lin[0](x), L.lin[1](x), L.lin[2](x), cos, sin,
                                            L.k_cache, L.v_cache, pos, scale_, impl_);
      check(o.defined(), "DecodeLayers: decode_attention declined the token (CPU, one float "
                         "dtype, no grad)");
      h = at::add(h, L.lin[3](o));
      x = rms_norm(h, L.post_norm, L.post_eps, impl_);
      check(x.defined(), "DecodeLayers: rms_norm declined h (CPU, one float dtype, no grad)");
      const at::Tensor gate = at::silu(L.lin[4](x));
      h = at::add(h, L.lin[6](at::mul(gate, L.lin[5](x))));
    }
    return h;
  }

 private:
  at::Tensor cos_, sin_;
  double scale_;
  int64_t impl_;
  std::vector<Layer> layers_;
  std::vector<py::object> owners_;  // the Decoders' Python objects, kept alive
};

}  // namespace

void bind_layers(py::module_& m) {
  py::class_<DecodeLayers>(m, "DecodeLayers")
      .def(py::init<const py::list&, at::Tensor, at::Tensor, double, int64_t>(),
           py::arg("layers"), py::arg("cos"), py::arg("sin"), py::arg("scale"),
           py::arg("impl") = 0)
      .def("__call__", &DecodeLayers::operator(), py::arg("h"), py::arg("pos"));
}

}  // namespace binllm_cpu
