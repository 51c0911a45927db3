// pybind11 bindings of the CUDA kernels (module fqkernels._cuda). Compiled by the
// host compiler; the kernels are reached only through the launchers in kernels.h.
// Tensors arrive as DLPack capsules; `stream` is the integer handle of the
// caller's current CUDA stream.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "fq/tensor_arg.h"
#include "kernels.h"

namespace py = pybind11;
using fq::DType;
using fq::TensorArg;

namespace {

TensorArg cuda_tensor(const py::object& obj, const char* name, std::initializer_list<DType> dtypes) {
  TensorArg a = fq::tensor_arg(obj, name);
  fq::require_device(a, kDLCUDA);
  fq::require_dtype(a, dtypes);
  fq::require_contiguous(a);
  return a;
}

void require_same_device(const TensorArg& a, const TensorArg& b) {
  if (a.device_id != b.device_id)
    throw py::value_error(std::string(b.name) + ": expected the CUDA device of " + a.name);
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
  TensorArg scale = cuda_tensor(scale_, "scale", {DType::f32});
  TensorArg out = cuda_tensor(out_, "out", kFloat);
  require_same_device(x, scale);
  require_same_device(x, out);
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
  TensorArg grad_y = cuda_tensor(grad_y_, "grad_y", kFloat);
  TensorArg grad_x = cuda_tensor(grad_x_, "grad_x", kFloat);
  TensorArg scale = cuda_tensor(scale_, "scale", {DType::f32});
  TensorArg grad_scale = cuda_tensor(grad_scale_, "grad_scale", {DType::f32});
  for (const TensorArg* t : {&grad_y, &grad_x, &scale, &grad_scale}) require_same_device(x, *t);
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

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fqkernels CUDA kernels (sm_80 / sm_90). Tensors are passed as DLPack capsules.";
  m.def("fake_quant_forward", &fake_quant_forward, py::arg("x"), py::arg("scale"), py::arg("out"),
        py::arg("bits"), py::arg("signed"), py::arg("axis") = py::none(), py::arg("stream") = 0);
  m.def("fake_quant_backward", &fake_quant_backward, py::arg("grad_y"), py::arg("x"), py::arg("scale"),
        py::arg("grad_x"), py::arg("grad_scale"), py::arg("bits"), py::arg("signed"),
        py::arg("axis") = py::none(), py::arg("grad_factor") = 1.0f, py::arg("stream") = 0);
}
