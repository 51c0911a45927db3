// pybind11 bindings of the CUDA kernels (module fqkernels._cuda). Compiled by the
// host compiler; the kernels are reached only through the launchers in kernels.h.
// Tensors arrive as DLPack capsules; `stream` is the integer handle of the
// caller's current CUDA stream.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>

#include "fq/fisher_binding.h"
#include "fq/tensor_arg.h"
#include "kernels.h"

namespace py = pybind11;
using fq::DType;
using fq::TensorArg;

namespace {

TensorArg cuda_tensor(const py::object& obj, const char* name, std::initializer_list<DType> dtypes) {
  return fq::checked_tensor(obj, name, kDLCUDA, dtypes);
}

int dtype_code(DType d) { return d == DType::f32 ? 0 : (d == DType::bf16 ? 1 : 2); }

void check_launch(const char* err) {
  if (err) throw std::runtime_error(std::string("CUDA launch failed: ") + err);
}

constexpr std::initializer_list<DType> kFloat = {DType::f32, DType::bf16, DType::f16};

void fake_quant_forward(py::object x_, py::object scale_, py::object out_, int bits, bool is_signed,
                        std::optional<int64_t> axis, uintptr_t stream) {
  fq::require_bits(bits, "bits");
  TensorArg x = cuda_tensor(x_, "x", kFloat);
  const fq::cuda::DeviceGuard guard(x.device_id);
  TensorArg scale = cuda_tensor(scale_, "scale", {DType::f32});
  TensorArg out = cuda_tensor(out_, "out", kFloat);
  fq::require_same_device(x, scale);
  fq::require_same_device(x, out);
  fq::require_same_dtype(x, out);
  fq::require_shape(out, x.shape);
  const auto l = fq::channel_layout(x, scale, axis.value_or(-1));
  check_launch(fq::cuda::fake_quant_forward(x.data, scale.ptr<float>(), out.data, dtype_code(x.dtype), l.outer,
                                            l.channels, l.inner, fq::qrange(bits, is_signed),
                                            reinterpret_cast<void*>(stream)));
}

void fake_quant_backward(py::object grad_y_, py::object x_, py::object scale_, py::object grad_x_,
                         py::object grad_scale_, int bits, bool is_signed, std::optional<int64_t> axis,
                         float grad_factor, uintptr_t stream) {
  fq::require_bits(bits, "bits");
  TensorArg x = cuda_tensor(x_, "x", kFloat);
  const fq::cuda::DeviceGuard guard(x.device_id);
  TensorArg grad_y = cuda_tensor(grad_y_, "grad_y", kFloat);
  TensorArg grad_x = cuda_tensor(grad_x_, "grad_x", kFloat);
  TensorArg scale = cuda_tensor(scale_, "scale", {DType::f32});
  TensorArg grad_scale = cuda_tensor(grad_scale_, "grad_scale", {DType::f32});
  for (const TensorArg* t : {&grad_y, &grad_x, &scale, &grad_scale}) fq::require_same_device(x, *t);
  fq::require_same_dtype(x, grad_y);
  fq::require_same_dtype(x, grad_x);
  fq::require_shape(grad_y, x.shape);
  fq::require_shape(grad_x, x.shape);
  const auto l = fq::channel_layout(x, scale, axis.value_or(-1));
  fq::require_shape(grad_scale, scale.shape);
  check_launch(fq::cuda::fake_quant_backward(grad_y.data, x.data, scale.ptr<float>(), grad_x.data,
                                             grad_scale.ptr<float>(), dtype_code(x.dtype), l.outer, l.channels,
                                             l.inner, fq::qrange(bits, is_signed), grad_factor,
                                             reinterpret_cast<void*>(stream)));
}

}  // namespace

// ---- quant_gemm (quant_linear / quant_matmul): strided 3-D operands ----
namespace {

TensorArg cuda_strided(const py::object& obj, const char* name, std::initializer_list<DType> dtypes, int64_t dim) {
  TensorArg a = fq::tensor_arg(obj, name);
  fq::require_device(a, kDLCUDA);
  fq::require_dtype(a, dtypes);
  if (a.dim() != dim)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(dim) + " dimensions, got " +
                          a.shape_str());
  return a;
}

fq::cuda::QuantOperand quant_operand(bool quantized, const py::object& scale_, const char* name, int bits,
                                     bool is_signed, const TensorArg& like, std::initializer_list<int64_t> numels) {
  fq::require_bits(bits, name);
  TensorArg scale = cuda_tensor(scale_, name, {DType::f32});
  fq::require_same_device(like, scale);
  bool ok = false;
  for (int64_t n : numels) ok = ok || scale.numel() == n;
  if (!ok) throw py::value_error(std::string(name) + ": unexpected number of elements, got " + scale.shape_str());
  return {quantized, scale.ptr<float>(), fq::qrange(bits, is_signed)};
}

void quant_gemm(py::object a_, py::object b_, py::object out_, bool quant_a, py::object a_scale_, int a_bits,
                bool a_signed, bool quant_b, py::object b_scale_, int b_bits, bool b_signed, int b_scale_mode,
                bool int8_path, std::optional<py::object> bias_, std::optional<py::object> e_, py::object e_scale_,
                int e_bits, bool e_signed, bool e_per_row, float grad_factor,
                std::optional<py::object> grad_scale_, uintptr_t stream) {
  TensorArg a = cuda_strided(a_, "a", kFloat, 3), b = cuda_strided(b_, "b", kFloat, 3);
  const fq::cuda::DeviceGuard guard(a.device_id);
  TensorArg out = cuda_strided(out_, "out", {DType::f32}, 3);
  for (const TensorArg* t : {&b, &out}) fq::require_same_device(a, *t);
  fq::require_same_dtype(a, b);
  const int64_t Z = a.shape[0], M = a.shape[1], K = a.shape[2], N = b.shape[2];
  fq::require_shape(b, {Z, K, N});
  fq::require_shape(out, {Z, M, N});
  if (b_scale_mode < 0 || b_scale_mode > 2) throw py::value_error("b_scale_mode: expected 0, 1 or 2");
  fq::cuda::QuantGemmArgs p{a.data, b.data, out.ptr<float>(), Z, M, N, K, {}, {}, {}, {}, {}, b_scale_mode,
                            nullptr, nullptr, {}, e_per_row, grad_factor, nullptr};
  for (int i = 0; i < 3; ++i) p.sa[i] = a.strides[i], p.sb[i] = b.strides[i], p.sc[i] = out.strides[i];
  p.qa = quant_operand(quant_a, a_scale_, "a_scale", a_bits, a_signed, a, {1});
  p.qb = quant_operand(quant_b, b_scale_, "b_scale", b_bits, b_signed, a, {1, b_scale_mode == 1 ? N : K});
  if (int8_path && !(quant_a && quant_b && b_scale_mode != 2 && K < (1 << 17) && p.qa.range.qmax <= 127 &&
                     p.qb.range.qmax <= 127))
    throw py::value_error("int8_path: needs both operands quantized to int8 codes, scales that factor out and "
                          "K < 2^17");
  if (bias_ && !bias_->is_none()) {
    TensorArg bias = cuda_tensor(*bias_, "bias", {DType::f32});
    fq::require_same_device(a, bias);
    fq::require_shape(bias, {N});
    p.bias = bias.ptr<float>();
  }
  if (e_ && !e_->is_none()) {
    TensorArg e = cuda_strided(*e_, "e", kFloat, 3);
    fq::require_same_device(a, e);
    fq::require_same_dtype(a, e);
    fq::require_shape(e, out.shape);
    for (int i = 0; i < 3; ++i)  // a size-1 dimension is only ever indexed at 0: its stride is free
      if (out.shape[i] > 1 && e.strides[i] != out.strides[i])
        throw py::value_error("e: expected the strides of out");
    p.e = e.data;
    p.qe = quant_operand(true, e_scale_, "e_scale", e_bits, e_signed, a, {e_per_row ? M : 1});
    if (!grad_scale_ || grad_scale_->is_none()) throw py::value_error("grad_scale: required with e");
    TensorArg gs = cuda_tensor(*grad_scale_, "grad_scale", {DType::f32});
    fq::require_same_device(a, gs);
    fq::require_shape(gs, {e_per_row ? M : 1});
    p.grad_scale = gs.ptr<float>();
  }
  check_launch(fq::cuda::quant_gemm(p, dtype_code(a.dtype), int8_path, reinterpret_cast<void*>(stream)));
}

}  // namespace

// ---- per_sample_fisher: squared per-sample weight gradients (and dW) in one pass ----
namespace {

void per_sample_fisher(py::object x_, py::object grad_out_, py::object fisher_, py::object grad_weight_,
                       py::object sq_norms_, int64_t batch_dim, bool accumulate_fisher, bool accumulate_grad_weight,
                       uintptr_t stream) {
  if (accumulate_grad_weight)
    throw py::value_error("accumulate_grad_weight: the CUDA kernel writes grad_weight; pass False");
  int device_id = 0;
  const fq::FisherArgs a = fq::parse_fisher_args(x_, grad_out_, fisher_, grad_weight_, sq_norms_, batch_dim,
                                                 accumulate_fisher, false, kDLCUDA, {DType::f32}, &device_id);
  const fq::cuda::DeviceGuard guard(device_id);
  check_launch(fq::cuda::per_sample_fisher(a, reinterpret_cast<void*>(stream)));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fqkernels CUDA kernels (sm_80 / sm_90). Tensors are passed as DLPack capsules.";
  m.def("fake_quant_forward", &fake_quant_forward, py::arg("x"), py::arg("scale"), py::arg("out"),
        py::arg("bits"), py::arg("signed"), py::arg("axis") = py::none(), py::arg("stream") = 0);
  m.def("fake_quant_backward", &fake_quant_backward, py::arg("grad_y"), py::arg("x"), py::arg("scale"),
        py::arg("grad_x"), py::arg("grad_scale"), py::arg("bits"), py::arg("signed"),
        py::arg("axis") = py::none(), py::arg("grad_factor") = 1.0f, py::arg("stream") = 0);
  m.def("quant_gemm", &quant_gemm, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("quant_a"),
        py::arg("a_scale"), py::arg("a_bits"), py::arg("a_signed"), py::arg("quant_b"), py::arg("b_scale"),
        py::arg("b_bits"), py::arg("b_signed"), py::arg("b_scale_mode"), py::arg("int8_path"), py::arg("bias"),
        py::arg("e"), py::arg("e_scale"), py::arg("e_bits"), py::arg("e_signed"), py::arg("e_per_row"),
        py::arg("grad_factor"), py::arg("grad_scale"), py::arg("stream") = 0,
        "out[z] = Qa(a[z]) @ Qb(b[z]) with the forward (bias) or STE (e, grad_scale) epilogue.");
  m.def("per_sample_fisher", &per_sample_fisher, py::arg("x"), py::arg("grad_out"), py::arg("fisher"),
        py::arg("grad_weight"), py::arg("sq_norms"), py::arg("batch_dim") = 0, py::arg("accumulate_fisher") = false,
        py::arg("accumulate_grad_weight") = false, py::arg("stream") = 0,
        "fisher [M, K] (+)= sum_n (D_n^T X_n)^2, grad_weight = sum_n D_n^T X_n, sq_norms [N] = ||D_n^T X_n||^2 "
        "for float32 x [N, T, K] / grad_out [N, T, M] (batch_dim 1: [T, N, *]; 2-D: T = 1), any strides.");
}
