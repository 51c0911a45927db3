// Argument checking for the pybind11 bindings: every tensor arrives as a DLPack
// capsule, is viewed (not copied) and checked here, and every failed check raises
// a Python ValueError/TypeError that names the argument and what was expected.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "fq/dlpack.h"

namespace fq {

namespace py = pybind11;

enum class DType { f32, bf16, f16, i8, i32, f64, other };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
    case DType::i8: return "int8";
    case DType::i32: return "int32";
    case DType::f64: return "float64";
    default: return "an unsupported dtype";
  }
}

struct TensorArg {
  const char* name;
  void* data;
  DType dtype;
  int device_type;
  int device_id;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;

  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  bool contiguous() const {
    if (numel() == 0) return true;  // nothing is read: torch gives empty tensors arbitrary strides
    int64_t expected = 1;
    for (int64_t i = dim() - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
  std::string shape_str() const {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }
  template <typename T> T* ptr() const { return static_cast<T*>(data); }
};

inline DType dtype_of(const DLDataType& t) {
  if (t.lanes != 1) return DType::other;
  if (t.code == kDLFloat && t.bits == 32) return DType::f32;
  if (t.code == kDLFloat && t.bits == 16) return DType::f16;
  if (t.code == kDLFloat && t.bits == 64) return DType::f64;
  if (t.code == kDLBfloat && t.bits == 16) return DType::bf16;
  if (t.code == kDLInt && t.bits == 8) return DType::i8;
  if (t.code == kDLInt && t.bits == 32) return DType::i32;
  return DType::other;
}

inline TensorArg tensor_arg(const py::object& obj, const char* name) {
  if (!py::isinstance<py::capsule>(obj))
    throw py::type_error(std::string(name) + ": expected a DLPack capsule of a tensor");
  py::capsule cap = py::reinterpret_borrow<py::capsule>(obj);
  if (std::string(cap.name() ? cap.name() : "") != "dltensor")
    throw py::value_error(std::string(name) + ": expected an unused 'dltensor' capsule");
  const DLTensor& t = cap.get_pointer<DLManagedTensor>()->dl_tensor;
  TensorArg a{name, static_cast<char*>(t.data) + t.byte_offset, dtype_of(t.dtype),
              t.device.device_type, t.device.device_id, {}, {}};
  a.shape.assign(t.shape, t.shape + t.ndim);
  if (t.strides) {
    a.strides.assign(t.strides, t.strides + t.ndim);
  } else {
    a.strides.resize(t.ndim);
    int64_t s = 1;
    for (int i = t.ndim - 1; i >= 0; --i) { a.strides[i] = s; s *= t.shape[i]; }
  }
  return a;
}

inline void require_dtype(const TensorArg& a, std::initializer_list<DType> allowed) {
  std::string names;
  for (DType d : allowed) {
    if (a.dtype == d) return;
    names += (names.empty() ? "" : " or ") + std::string(dtype_name(d));
  }
  throw py::type_error(std::string(a.name) + ": expected dtype " + names + ", got " + dtype_name(a.dtype));
}

inline void require_same_dtype(const TensorArg& a, const TensorArg& b) {
  if (a.dtype != b.dtype)
    throw py::type_error(std::string(b.name) + ": expected the dtype of " + a.name + " (" +
                         dtype_name(a.dtype) + "), got " + dtype_name(b.dtype));
}

inline void require_device(const TensorArg& a, int device_type) {
  if (a.device_type != device_type)
    throw py::value_error(std::string(a.name) + (device_type == kDLCPU ? ": expected a CPU tensor"
                                                                        : ": expected a CUDA tensor"));
}

inline void require_same_device(const TensorArg& a, const TensorArg& b) {
  if (a.device_type != b.device_type || a.device_id != b.device_id)
    throw py::value_error(std::string(b.name) + ": expected the device of " + a.name);
}

inline void require_contiguous(const TensorArg& a) {
  if (!a.contiguous()) throw py::value_error(std::string(a.name) + ": expected a contiguous tensor");
}

inline void require_shape(const TensorArg& a, const std::vector<int64_t>& shape) {
  if (a.shape != shape) {
    TensorArg expected = a;
    expected.shape = shape;
    throw py::value_error(std::string(a.name) + ": expected shape " + expected.shape_str() + ", got " +
                          a.shape_str());
  }
}

inline void require_bits(int bits, const char* name) {
  if (bits < 2 || bits > 8)
    throw py::value_error(std::string(name) + ": expected a bit-width in 2..8, got " + std::to_string(bits));
}

// A contiguous tensor on ``device_type`` with one of ``dtypes``: the usual kernel input.
inline TensorArg checked_tensor(const py::object& obj, const char* name, int device_type,
                                std::initializer_list<DType> dtypes) {
  TensorArg a = tensor_arg(obj, name);
  require_device(a, device_type);
  require_dtype(a, dtypes);
  require_contiguous(a);
  return a;
}

// Splits a tensor into [outer, channels, inner] around `axis` (per channel), or a
// single channel when axis < 0 (per tensor), and checks the scale vector against it.
struct ChannelLayout {
  int64_t outer, channels, inner;
};

inline ChannelLayout channel_layout(const TensorArg& x, const TensorArg& scale, int64_t axis) {
  if (axis >= x.dim())
    throw py::value_error("axis: expected a dimension of x (ndim " + std::to_string(x.dim()) + "), got " +
                          std::to_string(axis));
  ChannelLayout l{1, 1, x.numel()};
  if (axis >= 0) {
    l.channels = x.shape[axis];
    l.inner = 1;
    for (int64_t i = 0; i < axis; ++i) l.outer *= x.shape[i];
    for (int64_t i = axis + 1; i < x.dim(); ++i) l.inner *= x.shape[i];
  }
  if (scale.numel() != l.channels)
    throw py::value_error(std::string(scale.name) + ": expected " + std::to_string(l.channels) +
                          " element(s), got " + std::to_string(scale.numel()));
  return l;
}

}  // namespace fq
