// Parsing of per_sample_fisher's Python arguments into FisherArgs, shared by the CPU and
// CUDA bindings (they differ only in the device and the input dtypes they accept).
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "fq/fisher_args.h"
#include "fq/tensor_arg.h"

namespace fq {
namespace detail {

// A 2-D [N, F] or 3-D input seen as [N, T, F] through its element strides (no copy):
// T = 1 for 2-D inputs; batch_dim = 1 reads a sequence-first [T, N, F] tensor.
struct SampleView {
  int64_t n, t, f, s_n, s_t, s_f;
};

inline SampleView sample_view(const TensorArg& a, int64_t batch_dim) {
  if (a.dim() == 2) return {a.shape[0], 1, a.shape[1], a.strides[0], 0, a.strides[1]};
  const int64_t b = batch_dim, s = 1 - batch_dim;
  return {a.shape[b], a.shape[s], a.shape[2], a.strides[b], a.strides[s], a.strides[2]};
}

inline TensorArg strided_input(const py::object& obj, const char* name, int device_type,
                               std::initializer_list<DType> dtypes) {
  TensorArg a = tensor_arg(obj, name);
  require_device(a, device_type);
  require_dtype(a, dtypes);
  if (a.dim() != 2 && a.dim() != 3)
    throw py::value_error(std::string(name) + ": expected 2 or 3 dimensions, got shape " + a.shape_str());
  return a;
}

// Optional float32/float64 output of the given shape on x's device; nullptr for None.
inline void* optional_output(const py::object& obj, const char* name, const TensorArg& x,
                             const std::vector<int64_t>& shape, bool* f64) {
  if (obj.is_none()) return nullptr;
  TensorArg a = checked_tensor(obj, name, x.device_type, {DType::f32, DType::f64});
  require_same_device(x, a);
  require_shape(a, shape);
  *f64 = a.dtype == DType::f64;
  return a.data;
}

}  // namespace detail

// x / grad_out: ``input_dtypes`` on ``device_type``, any strides; outputs contiguous or None.
// Returns the arguments and, in *device_id, the device of x.
inline FisherArgs parse_fisher_args(const py::object& x_, const py::object& grad_out_, const py::object& fisher_,
                                    const py::object& grad_weight_, const py::object& sq_norms_, int64_t batch_dim,
                                    bool accumulate_fisher, bool accumulate_grad_weight, int device_type,
                                    std::initializer_list<DType> input_dtypes, int* device_id) {
  const TensorArg x = detail::strided_input(x_, "x", device_type, input_dtypes);
  const TensorArg d = detail::strided_input(grad_out_, "grad_out", device_type, input_dtypes);
  require_same_device(x, d);
  require_same_dtype(x, d);
  if (batch_dim != 0 && !(batch_dim == 1 && x.dim() == 3))
    throw py::value_error("batch_dim: expected 0 (or 1 for a 3-D [T, N, K] input), got " + std::to_string(batch_dim));
  if (d.dim() != x.dim() || !std::equal(x.shape.begin(), x.shape.end() - 1, d.shape.begin()))
    throw py::value_error("grad_out: expected the leading dimensions of x " + x.shape_str() + ", got shape " +
                          d.shape_str());
  const detail::SampleView xv = detail::sample_view(x, batch_dim), dv = detail::sample_view(d, batch_dim);
  FisherArgs a{};
  a.x = x.data;
  a.d = d.data;
  a.bf16 = x.dtype == DType::bf16;
  a.n = xv.n, a.t = xv.t, a.k = xv.f, a.m = dv.f;
  a.xs_n = xv.s_n, a.xs_t = xv.s_t, a.xs_k = xv.s_f;
  a.ds_n = dv.s_n, a.ds_t = dv.s_t, a.ds_m = dv.s_f;
  a.fisher = detail::optional_output(fisher_, "fisher", x, {a.m, a.k}, &a.fisher_f64);
  a.grad_weight = detail::optional_output(grad_weight_, "grad_weight", x, {a.m, a.k}, &a.grad_f64);
  a.sq_norms = detail::optional_output(sq_norms_, "sq_norms", x, {a.n}, &a.sq_f64);
  a.fisher_accumulate = accumulate_fisher;
  a.grad_accumulate = accumulate_grad_weight;
  *device_id = x.device_id;
  return a;
}

}  // namespace fq
