// The Python module fisherforget._C: importing it registers the torch.ops.fisherforget_C ops
// (bindings.cpp, bindings_cuda.cpp), and it offers the ops as plain Python functions,
// fisherforget._C.{fused_step, fisher_accumulate, fisher_score}, which the 'cpu' backend calls
// (and the 'cuda' backend for fused_step, which also takes CUDA tensors in CUDA builds), plus the
// host helpers of host_tables.h (layout_key, address_rows) and dry_run_fused_step.
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
#include <torch/csrc/utils/object_ptr.h>

#include <optional>
#include <string_view>
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "binding_checks.h"
#include "cpu/ff_cpu.h"
#include "host_tables.h"
#include "python_views.h"
#ifdef FISHERFORGET_WITH_CUDA
#include "bindings_cuda.h"
#endif

namespace {

namespace ff = fisherforget;
using ff::python::check_nargs;
using ff::python::PyTensors;
using ff::python::to_bool;
using ff::python::to_double;
using ff::python::to_optional_double;
using ff::python::to_optional_str;
using ff::python::to_optional_tensor;

// Where a fused_step call runs: the native CPU kernels, the CUDA kernels, or (dry run) the CUDA
// binding's host work on CPU tensors without any kernel.
enum class StepRoute { kByDevice, kDryRun };

// The kernels write the params through data pointers, which autograd does not see: bump their
// version counters, as torch's fused step does, so that a step between a forward and its
// backward is caught. Inference tensors have no counter.
void bump_versions(const PyTensors& params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& t = params[i];
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

PyObject* fused_step_entry(PyObject* const* args, Py_ssize_t nargs, const char* op,
                           StepRoute route) {
  check_nargs(nargs, ff::binding::kFusedStepArgs, op,
              "the lists of StepTensors, the StepHyper fields with lr_tensor after lr, grad_scale, "
              "found_inf");
  const PyTensors params(args[0], op, "params"), grads(args[1], op, "grads"),
      exp_avgs(args[2], op, "exp_avgs"), exp_avg_sqs(args[3], op, "exp_avg_sqs"),
      max_exp_avg_sqs(args[4], op, "max_exp_avg_sqs"), fishers(args[5], op, "fishers"),
      masks(args[6], op, "masks", /*allow_none=*/true), steps(args[7], op, "steps"),
      fisher_counts(args[8], op, "fisher_counts");
  ff::binding::StepArgs<PyTensors, PyTensors> step{
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps,
      fisher_counts, {}};
  // The scalars follow the lists, in FF_FUSED_STEP_SCALARS's order.
  Py_ssize_t next = ff::binding::kFusedStepLists;
#define FF_FROM_PYTHON_Float to_double
#define FF_FROM_PYTHON_Bool to_bool
#define FF_FROM_PYTHON_OptFloat to_optional_double
#define FF_FROM_PYTHON_OptStr to_optional_str
#define FF_FROM_PYTHON_OptTensor to_optional_tensor
#define FF_PARSE(kind, name) step.scalars.name = FF_FROM_PYTHON_##kind(args[next++], op, #name);
  FF_FUSED_STEP_SCALARS(FF_PARSE)
#undef FF_PARSE
  const bool on_cuda = !params.empty() && params[0].is_cuda();
  if (route == StepRoute::kByDevice && !on_cuda) {
    ff::binding::fused_step_on_cpu(step);
    bump_versions(params);
    Py_RETURN_NONE;
  }
#ifdef FISHERFORGET_WITH_CUDA
  ff::binding::fused_step_from_python(/*launch=*/route == StepRoute::kByDevice, step);
  if (route == StepRoute::kByDevice) bump_versions(params);
  Py_RETURN_NONE;
#else
  TORCH_CHECK(false, op, ": this build of fisherforget._C has the CPU kernels only (no CUDA "
              "kernels were compiled); ", on_cuda ? "params are CUDA tensors" : "the dry run "
              "needs the CUDA binding");
#endif
}

// fused_step(<the arguments of fisherforget_C::fused_step, all positional>): CPU tensors run
// the native CPU kernels, CUDA tensors the CUDA kernels (on the current stream).
PyObject* py_fused_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  return fused_step_entry(args, nargs, "fisherforget._C.fused_step", StepRoute::kByDevice);
  END_HANDLE_TH_ERRORS
}

#ifdef FISHERFORGET_TEST_OPS
// dry_run_fused_step(<the arguments of fused_step>, on CPU tensors): the CUDA binding's checks,
// dtype groups and launch tables, with no kernel run (the host-overhead benchmark). Built only
// for the tests and benchmarks of a checkout (FISHERFORGET_TEST_OPS=1, `make install`).
PyObject* py_dry_run_fused_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  return fused_step_entry(args, nargs, "fisherforget._C.dry_run_fused_step", StepRoute::kDryRun);
  END_HANDLE_TH_ERRORS
}
#endif

// layout_key(tensors) -> bytes (host_tables.h)
PyObject* py_layout_key(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* op = "fisherforget._C.layout_key";
  check_nargs(nargs, 1, op, "tensors");
  return ff::python::layout_key(PyTensors(args[0], op, "tensors"));
  END_HANDLE_TH_ERRORS
}

// address_rows(columns, aligned_columns) -> (rows, regular, aligned) (host_tables.h); columns is
// a sequence of tensor lists (items may be None) or None for an absent list.
PyObject* py_address_rows(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* op = "fisherforget._C.address_rows";
  check_nargs(nargs, 2, op, "columns, aligned_columns");
  const THPObjectPtr fast(PySequence_Fast(args[0], ""));  // released on every exit
  if (!fast) {
    PyErr_Clear();
    TORCH_CHECK_TYPE(false, op, ": columns must be a list or tuple, got ",
                     Py_TYPE(args[0])->tp_name);
  }
  const Py_ssize_t k = PySequence_Fast_GET_SIZE(fast.get());
  TORCH_CHECK(k > 0 && PySequence_Fast_GET_ITEM(fast.get(), 0) != Py_None, op,
              ": the first column must be a list of tensors");
  std::vector<std::unique_ptr<PyTensors>> owned;
  std::vector<const PyTensors*> columns;
  for (Py_ssize_t c = 0; c < k; ++c) {
    PyObject* item = PySequence_Fast_GET_ITEM(fast.get(), c);
    if (item == Py_None) {
      columns.push_back(nullptr);
    } else {
      const std::string name = "columns[" + std::to_string(c) + "]";
      owned.push_back(std::make_unique<PyTensors>(item, op, name.c_str(), /*allow_none=*/c > 0));
      columns.push_back(owned.back().get());
    }
  }
  const long aligned_columns = PyLong_AsLong(args[1]);
  if (aligned_columns == -1 && PyErr_Occurred()) return nullptr;
  const ff::python::AddressRows rows = ff::python::address_rows(
      columns, static_cast<size_t>(std::max(aligned_columns, 0L)), op);
  return Py_BuildValue("(NOO)", THPVariable_Wrap(rows.rows), rows.regular ? Py_True : Py_False,
                       rows.aligned ? Py_True : Py_False);
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
     METH_FASTCALL, "One Fisher-AdamW step on CPU or CUDA tensors (fisherforget_C::fused_step's "
                    "arguments, positional)."},
#ifdef FISHERFORGET_TEST_OPS
    {"dry_run_fused_step",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_dry_run_fused_step)),
     METH_FASTCALL, "fused_step's host work in the CUDA binding on CPU tensors, no kernel run "
                    "(benchmarks)."},
#endif
    {"layout_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_layout_key)),
     METH_FASTCALL, "Bytes equal for two tensor lists with the same types, dtypes, devices, "
                    "layouts and shapes, index by index."},
    {"address_rows", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_address_rows)),
     METH_FASTCALL, "(rows, regular, aligned): the int64 address table of tensor lists with "
                    "the first list's element counts last."},
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
