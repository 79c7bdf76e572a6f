// The CUDA side of the Python entry points (defined in bindings_cuda.cpp, which exists in builds
// with the CUDA kernels only, FISHERFORGET_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "binding_checks.h"
#include "python_views.h"

namespace fisherforget {
namespace binding {

using PythonStepArgs = StepArgs<python::PyTensors, python::PyTensors>;

// fisherforget._C.fused_step for CUDA tensors (launch == true), or, with launch == false, the
// same host work (checks, dtype groups, launch tables) on CPU tensors with no kernel run: what
// the host-overhead benchmark times.
void fused_step_from_python(bool launch, const PythonStepArgs& args);

}  // namespace binding
}  // namespace fisherforget
