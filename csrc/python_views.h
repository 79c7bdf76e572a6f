// Reading Python arguments in place, for the Python entry points of fisherforget._C
// (bindings_python.cpp, and the CUDA side in bindings_cuda.cpp): a list of tensors is viewed
// inside its Python list (no at::Tensor copies, whose reference counts would go through the
// Python objects), and scalars are converted with errors naming the argument. Every function
// needs the GIL held.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string_view>

namespace fisherforget {
namespace python {

// A Python list or tuple of tensors, read in place (the views binding_checks.h expects).
class PyTensors {
 public:
  PyTensors(PyObject* sequence, const char* op, const char* name, bool allow_none = false) {
    fast_ = PySequence_Fast(sequence, "");
    if (fast_ == nullptr) {
      PyErr_Clear();
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be a list or tuple of tensors, got ",
                       Py_TYPE(sequence)->tp_name);
    }
    items_ = PySequence_Fast_ITEMS(fast_);
    size_ = static_cast<size_t>(PySequence_Fast_GET_SIZE(fast_));
    for (size_t i = 0; i < size_; ++i) {
      PyObject* item = items_[i];
      TORCH_CHECK_TYPE((allow_none && item == Py_None) || THPVariable_Check(item), op, ": ", name,
                       "[", i, "] must be a tensor", allow_none ? " or None" : "", ", got ",
                       Py_TYPE(item)->tp_name);
    }
  }
  PyTensors(const PyTensors&) = delete;
  PyTensors& operator=(const PyTensors&) = delete;
  ~PyTensors() { Py_XDECREF(fast_); }

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  const at::Tensor& operator[](size_t i) const { return THPVariable_Unpack(items_[i]); }
  const at::Tensor* at(size_t i) const {  // mask lists: null for None
    return items_[i] == Py_None ? nullptr : &THPVariable_Unpack(items_[i]);
  }
  PyObject* object(size_t i) const { return items_[i]; }

 private:
  PyObject* fast_ = nullptr;
  PyObject* const* items_ = nullptr;
  size_t size_ = 0;
};

inline double to_double(PyObject* value, const char* op, const char* name) {
  const double out = PyFloat_AsDouble(value);
  if (out == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK_TYPE(false, op, ": ", name, " must be a number, got ", Py_TYPE(value)->tp_name);
  }
  return out;
}

inline std::optional<double> to_optional_double(PyObject* value, const char* op, const char* name) {
  if (value == Py_None) return std::nullopt;
  return to_double(value, op, name);
}

inline bool to_bool(PyObject* value, const char* op, const char* name) {
  TORCH_CHECK_TYPE(PyBool_Check(value), op, ": ", name, " must be a bool, got ",
                   Py_TYPE(value)->tp_name);
  return value == Py_True;
}

inline std::optional<at::Tensor> to_optional_tensor(PyObject* value, const char* op, const char* name) {
  if (value == Py_None) return std::nullopt;
  TORCH_CHECK_TYPE(THPVariable_Check(value), op, ": ", name, " must be a tensor or None, got ",
                   Py_TYPE(value)->tp_name);
  return THPVariable_Unpack(value);
}

inline std::optional<c10::string_view> to_optional_str(PyObject* value, const char* op,
                                                const char* name) {
  if (value == Py_None) return std::nullopt;
  Py_ssize_t size = 0;
  const char* text = PyUnicode_Check(value) ? PyUnicode_AsUTF8AndSize(value, &size) : nullptr;
  if (text == nullptr) {
    PyErr_Clear();
    TORCH_CHECK_TYPE(false, op, ": ", name, " must be a str or None, got ",
                     Py_TYPE(value)->tp_name);
  }
  return c10::string_view(text, static_cast<size_t>(size));
}

inline void check_nargs(Py_ssize_t nargs, Py_ssize_t expected, const char* op, const char* signature) {
  TORCH_CHECK_TYPE(nargs == expected, op, " takes ", expected, " positional arguments (",
                   signature, "), got ", nargs);
}

}  // namespace python
}  // namespace fisherforget
