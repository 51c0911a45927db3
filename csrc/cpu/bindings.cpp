// pybind11 bindings of the CPU kernels (module fqkernels._cpu). Tensors arrive as
// DLPack capsules; outputs are allocated by the caller (Python) and written here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "fake_quant.h"
#include "fq/tensor_arg.h"

namespace py = pybind11;
using fq::DType;
using fq::TensorArg;

namespace {

TensorArg cpu_tensor(const py::object& obj, const char* name, std::initializer_list<DType> dtypes) {
  TensorArg a = fq::tensor_arg(obj, name);
  fq::require_device(a, kDLCPU);
  fq::require_dtype(a, dtypes);
  fq::require_contiguous(a);
  return a;
}

void fake_quant_forward(py::object x_, py::object scale_, py::object out_, int bits, bool is_signed,
                        std::optional<int64_t> axis) {
  fq::require_bits(bits, "bits");
  TensorArg x = cpu_tensor(x_, "x", {DType::f32, DType::bf16});
  TensorArg scale = cpu_tensor(scale_, "scale", {DType::f32});
  TensorArg out = cpu_tensor(out_, "out", {DType::f32, DType::bf16});
  fq::require_same_dtype(x, out);
  fq::require_shape(out, x.shape);
  const auto l = fq::channel_layout(x, scale, axis.value_or(-1));
  const auto r = fq::qrange(bits, is_signed);
  py::gil_scoped_release nogil;
  if (x.dtype == DType::f32)
    fq::cpu::fake_quant_forward(x.ptr<float>(), scale.ptr<float>(), out.ptr<float>(), l.outer, l.channels,
                                l.inner, r);
  else
    fq::cpu::fake_quant_forward(x.ptr<uint16_t>(), scale.ptr<float>(), out.ptr<uint16_t>(), l.outer,
                                l.channels, l.inner, r);
}

void fake_quant_backward(py::object grad_y_, py::object x_, py::object scale_, py::object grad_x_,
                         py::object grad_scale_, int bits, bool is_signed, std::optional<int64_t> axis,
                         float grad_factor) {
  fq::require_bits(bits, "bits");
  TensorArg x = cpu_tensor(x_, "x", {DType::f32, DType::bf16});
  TensorArg grad_y = cpu_tensor(grad_y_, "grad_y", {DType::f32, DType::bf16});
  TensorArg grad_x = cpu_tensor(grad_x_, "grad_x", {DType::f32, DType::bf16});
  TensorArg scale = cpu_tensor(scale_, "scale", {DType::f32});
  TensorArg grad_scale = cpu_tensor(grad_scale_, "grad_scale", {DType::f32});
  fq::require_same_dtype(x, grad_y);
  fq::require_same_dtype(x, grad_x);
  fq::require_shape(grad_y, x.shape);
  fq::require_shape(grad_x, x.shape);
  const auto l = fq::channel_layout(x, scale, axis.value_or(-1));
  fq::require_shape(grad_scale, scale.shape);
  const auto r = fq::qrange(bits, is_signed);
  py::gil_scoped_release nogil;
  if (x.dtype == DType::f32)
    fq::cpu::fake_quant_backward(grad_y.ptr<float>(), x.ptr<float>(), scale.ptr<float>(), grad_x.ptr<float>(),
                                 grad_scale.ptr<float>(), l.outer, l.channels, l.inner, r, grad_factor);
  else
    fq::cpu::fake_quant_backward(grad_y.ptr<uint16_t>(), x.ptr<uint16_t>(), scale.ptr<float>(),
                                 grad_x.ptr<uint16_t>(), grad_scale.ptr<float>(), l.outer, l.channels, l.inner,
                                 r, grad_factor);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fqkernels CPU kernels (C++ / OpenMP / SIMD). Tensors are passed as DLPack capsules.";
  m.def("fake_quant_forward", &fake_quant_forward, py::arg("x"), py::arg("scale"), py::arg("out"),
        py::arg("bits"), py::arg("signed"), py::arg("axis") = py::none(),
        "out = fake_quant(x) with one scale per channel along axis (per tensor when axis is None).");
  m.def("fake_quant_backward", &fake_quant_backward, py::arg("grad_y"), py::arg("x"), py::arg("scale"),
        py::arg("grad_x"), py::arg("grad_scale"), py::arg("bits"), py::arg("signed"),
        py::arg("axis") = py::none(), py::arg("grad_factor") = 1.0f,
        "STE input gradient into grad_x and LSQ scale gradient into grad_scale.");
}
