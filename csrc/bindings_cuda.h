// The CUDA side of the Python entry points (defined in bindings_cuda.cpp, which exists in builds
// with the CUDA kernels only, FISHERFORGET_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "python_views.h"

namespace fisherforget {
namespace binding {

// fisherforget._C.fused_step for CUDA tensors (launch == true), or, with launch == false, the
// same host work (checks, dtype groups, launch tables) on CPU tensors with no kernel run: what
// the host-overhead benchmark times. The arguments are those of the fused_step schema.
void fused_step_from_python(bool launch, const python::PyTensors& params,
                            const python::PyTensors& grads, const python::PyTensors& exp_avgs,
                            const python::PyTensors& exp_avg_sqs,
                            const python::PyTensors& max_exp_avg_sqs,
                            const python::PyTensors& fishers, const python::PyTensors& masks,
                            const python::PyTensors& steps,
                            const python::PyTensors& fisher_counts, double lr,
                            const std::optional<at::Tensor>& lr_tensor, double beta1,
                            double beta2, double eps, double weight_decay, bool amsgrad,
                            bool maximize, std::optional<c10::string_view> fisher_mode,
                            double fisher_beta, double fisher_scale,
                            std::optional<double> freeze_above, std::optional<double> freeze_below,
                            const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf);

}  // namespace binding
}  // namespace fisherforget
