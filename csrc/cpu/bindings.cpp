// pybind11 bindings of the CPU kernels (module fqkernels._cpu). Tensors arrive as
// DLPack capsules; outputs are allocated by the caller (Python) and written here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <utility>
#include <vector>

#include "fake_quant.h"
#include "fisher.h"
#include "ms_deform_attn.h"
#include "quant_linear.h"
#include "fq/fisher_binding.h"
#include "fq/tensor_arg.h"

namespace py = pybind11;
using fq::DType;
using fq::TensorArg;

namespace {

TensorArg cpu_tensor(const py::object& obj, const char* name, std::initializer_list<DType> dtypes) {
  return fq::checked_tensor(obj, name, kDLCPU, dtypes);
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

// ---- quant_linear: exact integer path (quantize to int8 codes, int32 epilogue) ----
namespace {

bool quant_act_codes(py::object x_, py::object scale_, py::object codes_, int bits, bool is_signed) {
  fq::require_bits(bits, "bits");
  TensorArg x = cpu_tensor(x_, "x", {DType::f32});
  TensorArg scale = cpu_tensor(scale_, "scale", {DType::f32});
  TensorArg codes = cpu_tensor(codes_, "codes", {DType::i8});
  fq::require_shape(scale, {1});
  fq::require_shape(codes, x.shape);
  const auto r = fq::qrange(bits, is_signed);
  py::gil_scoped_release nogil;
  return fq::cpu::quantize_act_codes(x.ptr<float>(), codes.ptr<int8_t>(), x.numel(), *scale.ptr<float>(), r);
}

bool quant_weight_codes_t(py::object weight_, py::object scale_, py::object codes_t_, py::object row_sums_,
                          int bits) {
  fq::require_bits(bits, "bits");
  TensorArg w = cpu_tensor(weight_, "weight", {DType::f32});
  TensorArg scale = cpu_tensor(scale_, "scale", {DType::f32});
  TensorArg codes_t = cpu_tensor(codes_t_, "codes_t", {DType::i8});
  TensorArg row_sums = cpu_tensor(row_sums_, "row_sums", {DType::i32});
  if (w.dim() != 2) throw py::value_error("weight: expected 2 dimensions, got shape " + w.shape_str());
  if (w.shape[1] > fq::cpu::kMaxExactK)
    throw py::value_error("weight: the int32 accumulator is exact for at most " +
                          std::to_string(fq::cpu::kMaxExactK) + " input features, got " + w.shape_str());
  fq::require_shape(scale, {w.shape[0]});
  fq::require_shape(codes_t, {w.shape[1], w.shape[0]});
  fq::require_shape(row_sums, {w.shape[0]});
  const auto r = fq::qrange(bits, true);
  py::gil_scoped_release nogil;
  return fq::cpu::quantize_weight_codes_t(w.ptr<float>(), scale.ptr<float>(), codes_t.ptr<int8_t>(),
                                          row_sums.ptr<int32_t>(), w.shape[0], w.shape[1], r);
}

void int_accum_epilogue(py::object acc_, py::object a_scale_, py::object w_scale_, py::object row_sums_,
                        std::optional<py::object> bias_, int a_bits, bool a_signed) {
  fq::require_bits(a_bits, "a_bits");
  TensorArg acc = cpu_tensor(acc_, "acc", {DType::i32});
  TensorArg a_scale = cpu_tensor(a_scale_, "a_scale", {DType::f32});
  TensorArg w_scale = cpu_tensor(w_scale_, "w_scale", {DType::f32});
  TensorArg row_sums = cpu_tensor(row_sums_, "row_sums", {DType::i32});
  if (acc.dim() != 2) throw py::value_error("acc: expected 2 dimensions, got shape " + acc.shape_str());
  fq::require_shape(a_scale, {1});
  fq::require_shape(w_scale, {acc.shape[1]});
  fq::require_shape(row_sums, {acc.shape[1]});
  const float* bias = nullptr;
  if (bias_ && !bias_->is_none()) {
    TensorArg b = cpu_tensor(*bias_, "bias", {DType::f32});
    fq::require_shape(b, {acc.shape[1]});
    bias = b.ptr<float>();
  }
  const int32_t offset = fq::cpu::int8_code_offset(fq::qrange(a_bits, a_signed));
  py::gil_scoped_release nogil;
  fq::cpu::int_accum_epilogue(acc.data, acc.shape[0], acc.shape[1], *a_scale.ptr<float>(), w_scale.ptr<float>(),
                              row_sums.ptr<int32_t>(), offset, bias);
}

}  // namespace

// ---- per_sample_fisher: squared per-sample weight gradients (and dW) in one pass ----
namespace {

void per_sample_fisher(py::object x_, py::object grad_out_, py::object fisher_, py::object grad_weight_,
                       py::object sq_norms_, int64_t batch_dim, bool accumulate_fisher, bool accumulate_grad_weight) {
  int device_id = 0;
  const fq::FisherArgs a = fq::parse_fisher_args(x_, grad_out_, fisher_, grad_weight_, sq_norms_, batch_dim,
                                                 accumulate_fisher, accumulate_grad_weight, kDLCPU,
                                                 {DType::f32, DType::bf16}, &device_id);
  py::gil_scoped_release nogil;
  fq::cpu::per_sample_fisher(a);
}

}  // namespace

// ---- ms_deform_attn: multi-scale deformable attention core (bilinear sampling, weighted sum) ----
namespace {

using SpatialShapes = std::vector<std::pair<int64_t, int64_t>>;

// The sizes of one call, every tensor checked against value [N, S, M, D] and spatial_shapes
// [(H_l, W_l)]: locations [N, Lq, M, L, P, 2], weights [N, Lq, M, L, P], one dtype for all.
fq::cpu::MsDeformAttnShape msda_shape(const TensorArg& value, const SpatialShapes& shapes,
                                      const TensorArg& locations, const TensorArg& weights) {
  if (value.dim() != 4) throw py::value_error("value: expected [N, S, M, D], got shape " + value.shape_str());
  fq::cpu::MsDeformAttnShape sh{value.shape[0], value.shape[1], value.shape[2], value.shape[3], 0, 0, {}, {}, {}};
  int64_t covered = 0;
  for (const auto& [h, w] : shapes) {
    if (h < 1 || w < 1)
      throw py::value_error("spatial_shapes: expected positive (H, W) per level, got (" + std::to_string(h) +
                            ", " + std::to_string(w) + ")");
    sh.heights.push_back(h);
    sh.widths.push_back(w);
    sh.starts.push_back(covered);
    covered += h * w;
  }
  if (covered != sh.s)
    throw py::value_error("spatial_shapes: expected sum H_l * W_l == S (value's dim 1) = " + std::to_string(sh.s) +
                          ", got " + std::to_string(covered));
  if (locations.dim() != 6)
    throw py::value_error("sampling_locations: expected [N, Lq, M, L, P, 2], got shape " + locations.shape_str());
  sh.lq = locations.shape[1];
  sh.points = locations.shape[4];
  fq::require_shape(locations, {sh.n, sh.lq, sh.m, sh.levels(), sh.points, 2});
  fq::require_shape(weights, {sh.n, sh.lq, sh.m, sh.levels(), sh.points});
  fq::require_same_dtype(value, locations);
  fq::require_same_dtype(value, weights);
  return sh;
}

TensorArg msda_tensor(const py::object& obj, const char* name) {
  return cpu_tensor(obj, name, {DType::f32, DType::f64});
}

void ms_deform_attn_forward(py::object value_, const SpatialShapes& spatial_shapes, py::object locations_,
                            py::object weights_, py::object out_) {
  TensorArg value = msda_tensor(value_, "value"), locations = msda_tensor(locations_, "sampling_locations");
  TensorArg weights = msda_tensor(weights_, "attention_weights"), out = msda_tensor(out_, "out");
  const auto sh = msda_shape(value, spatial_shapes, locations, weights);
  fq::require_same_dtype(value, out);
  fq::require_shape(out, {sh.n, sh.lq, sh.m * sh.d});
  py::gil_scoped_release nogil;
  if (value.dtype == DType::f32)
    fq::cpu::ms_deform_attn_forward(value.ptr<float>(), locations.ptr<float>(), weights.ptr<float>(),
                                    out.ptr<float>(), sh);
  else
    fq::cpu::ms_deform_attn_forward(value.ptr<double>(), locations.ptr<double>(), weights.ptr<double>(),
                                    out.ptr<double>(), sh);
}

void ms_deform_attn_backward(py::object grad_out_, py::object value_, const SpatialShapes& spatial_shapes,
                             py::object locations_, py::object weights_, py::object grad_value_,
                             py::object grad_locations_, py::object grad_weights_) {
  TensorArg value = msda_tensor(value_, "value"), locations = msda_tensor(locations_, "sampling_locations");
  TensorArg weights = msda_tensor(weights_, "attention_weights"), grad_out = msda_tensor(grad_out_, "grad_out");
  TensorArg grad_value = msda_tensor(grad_value_, "grad_value");
  TensorArg grad_locations = msda_tensor(grad_locations_, "grad_locations");
  TensorArg grad_weights = msda_tensor(grad_weights_, "grad_weights");
  const auto sh = msda_shape(value, spatial_shapes, locations, weights);
  for (const TensorArg* t : {&grad_out, &grad_value, &grad_locations, &grad_weights}) fq::require_same_dtype(value, *t);
  fq::require_shape(grad_out, {sh.n, sh.lq, sh.m * sh.d});
  fq::require_shape(grad_value, value.shape);
  fq::require_shape(grad_locations, locations.shape);
  fq::require_shape(grad_weights, weights.shape);
  py::gil_scoped_release nogil;
  if (value.dtype == DType::f32)
    fq::cpu::ms_deform_attn_backward(grad_out.ptr<float>(), value.ptr<float>(), locations.ptr<float>(),
                                     weights.ptr<float>(), grad_value.ptr<float>(), grad_locations.ptr<float>(),
                                     grad_weights.ptr<float>(), sh);
  else
    fq::cpu::ms_deform_attn_backward(grad_out.ptr<double>(), value.ptr<double>(), locations.ptr<double>(),
                                     weights.ptr<double>(), grad_value.ptr<double>(), grad_locations.ptr<double>(),
                                     grad_weights.ptr<double>(), sh);
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
  m.def("quant_act_codes", &quant_act_codes, py::arg("x"), py::arg("scale"), py::arg("codes"), py::arg("bits"),
        py::arg("signed"),
        "int8 codes of x (per tensor; unsigned 8 bit shifted by -128). Returns True if x holds NaN.");
  m.def("quant_weight_codes_t", &quant_weight_codes_t, py::arg("weight"), py::arg("scale"), py::arg("codes_t"),
        py::arg("row_sums"), py::arg("bits"),
        "Signed int8 codes of weight [N, K] per row, written transposed [K, N], and their row sums. "
        "Returns True if weight holds NaN.");
  m.def("int_accum_epilogue", &int_accum_epilogue, py::arg("acc"), py::arg("a_scale"), py::arg("w_scale"),
        py::arg("row_sums"), py::arg("bias"), py::arg("a_bits"), py::arg("a_signed"),
        "Rewrites the int32 accumulator [T, N] in place as float32 y = acc * a_scale * w_scale + bias.");
  m.attr("MAX_EXACT_K") = fq::cpu::kMaxExactK;
  m.def("per_sample_fisher", &per_sample_fisher, py::arg("x"), py::arg("grad_out"), py::arg("fisher"),
        py::arg("grad_weight"), py::arg("sq_norms"), py::arg("batch_dim") = 0, py::arg("accumulate_fisher") = false,
        py::arg("accumulate_grad_weight") = false,
        "For x [N, T, K] / grad_out [N, T, M] (batch_dim 0; 1: [T, N, *]; 2-D: T = 1), any strides: "
        "fisher [M, K] (+)= sum_n (D_n^T X_n)^2, grad_weight [M, K] (+)= sum_n D_n^T X_n, "
        "sq_norms [N] = ||D_n^T X_n||^2; each output float32/float64 or None.");
  m.def("ms_deform_attn_forward", &ms_deform_attn_forward, py::arg("value"), py::arg("spatial_shapes"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("out"),
        "out [N, Lq, M*D] = sum over levels and points of attention_weights [N, Lq, M, L, P] times value "
        "[N, S, M, D] sampled bilinearly (zeros outside) at sampling_locations [N, Lq, M, L, P, 2] of levels "
        "spatial_shapes [(H_l, W_l)]; float32 or float64, contiguous.");
  m.def("ms_deform_attn_backward", &ms_deform_attn_backward, py::arg("grad_out"), py::arg("value"),
        py::arg("spatial_shapes"), py::arg("sampling_locations"), py::arg("attention_weights"),
        py::arg("grad_value"), py::arg("grad_locations"), py::arg("grad_weights"),
        "Writes the gradients of ms_deform_attn_forward's inputs given grad_out [N, Lq, M*D].");
}
