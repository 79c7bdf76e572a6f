// The Python module fisherforget._C: importing it registers the torch.ops.fisherforget_C ops
// (bindings.cpp, bindings_cuda.cpp), and it offers the CPU ops as plain Python functions,
// fisherforget._C.{fused_step, fisher_accumulate, fisher_score}, which the 'cpu' backend calls.
//
// Why a second entry point: a torch.ops call converts every tensor list into a boxed IValue list
// and then into a vector of tensors, and each copy of a tensor that only its Python object holds
// takes (and, with the GIL released by torch.ops, re-acquires) a reference on that Python object:
// for 2,000 tensors in nine lists that is milliseconds, far more than the kernels. These
// functions read the tensors in place inside the Python lists (no copies) and run the same
// checks (binding_checks.h) and kernels as the CPU ops, with the GIL held (the lists stay valid).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string_view>
#include <vector>

#include "binding_checks.h"
#include "cpu/ff_cpu.h"

namespace {

namespace ff = fisherforget;

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

 private:
  PyObject* fast_ = nullptr;
  PyObject* const* items_ = nullptr;
  size_t size_ = 0;
};

double to_double(PyObject* value, const char* op, const char* name) {
  const double out = PyFloat_AsDouble(value);
  if (out == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK_TYPE(false, op, ": ", name, " must be a number, got ", Py_TYPE(value)->tp_name);
  }
  return out;
}

std::optional<double> to_optional_double(PyObject* value, const char* op, const char* name) {
  if (value == Py_None) return std::nullopt;
  return to_double(value, op, name);
}

bool to_bool(PyObject* value, const char* op, const char* name) {
  TORCH_CHECK_TYPE(PyBool_Check(value), op, ": ", name, " must be a bool, got ",
                   Py_TYPE(value)->tp_name);
  return value == Py_True;
}

std::optional<at::Tensor> to_optional_tensor(PyObject* value, const char* op, const char* name) {
  if (value == Py_None) return std::nullopt;
  TORCH_CHECK_TYPE(THPVariable_Check(value), op, ": ", name, " must be a tensor or None, got ",
                   Py_TYPE(value)->tp_name);
  return THPVariable_Unpack(value);
}

std::optional<c10::string_view> to_optional_str(PyObject* value, const char* op,
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

void check_nargs(Py_ssize_t nargs, Py_ssize_t expected, const char* op, const char* signature) {
  TORCH_CHECK_TYPE(nargs == expected, op, " takes ", expected, " positional arguments (",
                   signature, "), got ", nargs);
}

// fused_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps,
//            fisher_counts, lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize,
//            fisher_mode, fisher_beta, fisher_scale, freeze_above, freeze_below, grad_scale,
//            found_inf): the schema of fisherforget_C::fused_step, all positional.
PyObject* py_fused_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* op = "fisherforget._C.fused_step";
  check_nargs(nargs, 24, op, "the lists of StepTensors, the StepHyper fields with lr_tensor "
                             "after lr, grad_scale, found_inf");
  const PyTensors params(args[0], op, "params"), grads(args[1], op, "grads"),
      exp_avgs(args[2], op, "exp_avgs"), exp_avg_sqs(args[3], op, "exp_avg_sqs"),
      max_exp_avg_sqs(args[4], op, "max_exp_avg_sqs"), fishers(args[5], op, "fishers"),
      masks(args[6], op, "masks", /*allow_none=*/true), steps(args[7], op, "steps"),
      fisher_counts(args[8], op, "fisher_counts");
  ff::binding::fused_step_on_cpu(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps,
      fisher_counts, to_double(args[9], op, "lr"), to_optional_tensor(args[10], op, "lr_tensor"),
      to_double(args[11], op, "beta1"), to_double(args[12], op, "beta2"),
      to_double(args[13], op, "eps"), to_double(args[14], op, "weight_decay"),
      to_bool(args[15], op, "amsgrad"), to_bool(args[16], op, "maximize"),
      to_optional_str(args[17], op, "fisher_mode"), to_double(args[18], op, "fisher_beta"),
      to_double(args[19], op, "fisher_scale"), to_optional_double(args[20], op, "freeze_above"),
      to_optional_double(args[21], op, "freeze_below"),
      to_optional_tensor(args[22], op, "grad_scale"), to_optional_tensor(args[23], op, "found_inf"));
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// fisher_accumulate(fishers, grads, alpha, beta, grad_scale)
PyObject* py_fisher_accumulate(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* op = "fisherforget._C.fisher_accumulate";
  check_nargs(nargs, 5, op, "fishers, grads, alpha, beta, grad_scale");
  const PyTensors fishers(args[0], op, "fishers"), grads(args[1], op, "grads");
  ff::binding::fisher_accumulate_on_cpu(fishers, grads, to_double(args[2], op, "alpha"),
                                        to_double(args[3], op, "beta"),
                                        to_optional_tensor(args[4], op, "grad_scale"));
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// fisher_score(directions, grads, fishers) -> float64 tensor [sum d*g, sum F*g^2]
PyObject* py_fisher_score(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* op = "fisherforget._C.fisher_score";
  check_nargs(nargs, 3, op, "directions, grads, fishers");
  const PyTensors directions(args[0], op, "directions"), grads(args[1], op, "grads"),
      fishers(args[2], op, "fishers");
  return THPVariable_Wrap(ff::binding::fisher_score_on_cpu(directions, grads, fishers));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"fused_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_fused_step)),
     METH_FASTCALL, "One Fisher-AdamW step on CPU tensors (fisherforget_C::fused_step's arguments, "
                    "positional)."},
    {"fisher_accumulate",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_fisher_accumulate)),
     METH_FASTCALL, "F = alpha*F + beta*(g/grad_scale)^2 on CPU tensors."},
    {"fisher_score", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_fisher_score)),
     METH_FASTCALL, "[sum d*g, sum F*g^2] (float64) of CPU tensors, deterministically."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import fisherforget._C` loads this library (registering the torch.ops above).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "fisherforget kernels (CPU, and CUDA where built); the ops live in torch.ops.fisherforget_C",
      -1, methods};
  return PyModule_Create(&module_def);
}
