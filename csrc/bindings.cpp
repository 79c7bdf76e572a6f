// The torch-facing side of fisherforget._C: defines the torch.ops.fisherforget_C op schemas and
// runs CPU tensors on the native CPU kernels (csrc/cpu/). CUDA tensors are served by
// bindings_cuda.cpp, which exists only in builds with the CUDA kernels; this file needs no CUDA
// headers, so a CPU-only build (no nvcc, or torch without CUDA) compiles it alone.
//
// Each op is one kernel call over all its tensors: the checks (binding_checks.h) fill a table of
// pointers, which the kernels split between threads by element count. A non-contiguous tensor is
// stepped through a contiguous copy here (the Python glue does no per-tensor work). The Python
// module itself, with faster entry points to the same CPU kernels, is bindings_python.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "binding_checks.h"
#include "cpu/ff_cpu.h"
#include "ff_kernels.h"

namespace {

namespace ff = fisherforget;

void run_fused_step_cpu(const ff::binding::TorchStepArgs& args) {
  ff::binding::fused_step_on_cpu(args);
}

void fisher_accumulate_cpu(at::TensorList fishers, at::TensorList grads, double alpha,
                           double beta, const std::optional<at::Tensor>& grad_scale) {
  ff::binding::fisher_accumulate_on_cpu(fishers, grads, alpha, beta, grad_scale);
}

at::Tensor fisher_score_cpu(at::TensorList directions, at::TensorList grads,
                            at::TensorList fishers) {
  return ff::binding::fisher_score_on_cpu(directions, grads, fishers);
}

// "kernels=cpu,cuda;archs=800,900;cuda=13000;cpu_isa=avx2;test_ops=0": what this build holds.
// archs and cuda are empty / 0 in a CPU-only build.
std::string build_info() {
  std::ostringstream out;
#ifdef FISHERFORGET_WITH_CUDA
  out << "archs=" << ff::compiled_cuda_archs() << ";cuda=" << ff::compiled_cuda_version()
      << ";kernels=cpu,cuda";
#else
  out << "archs=;cuda=0;kernels=cpu";
#endif
  out << ";cpu_isa=" << ff::cpu::isa();
#ifdef FISHERFORGET_TEST_OPS
  out << ";test_ops=1";  // the emulated_* ops and dry_run_fused_step (builds for the tests)
#else
  out << ";test_ops=0";
#endif
  return out.str();
}

// The CPU inner loops in use ("avx2" or "scalar"); with an argument, switches to them first
// (tests compare both; "avx2" is refused where the CPU lacks AVX2, FMA or F16C).
std::string cpu_isa(std::optional<c10::string_view> isa) {
  if (isa.has_value()) {
    const std::string name(isa->data(), isa->size());
    TORCH_CHECK(ff::cpu::set_isa(name.c_str()), "fisherforget_C::cpu_isa: '", name,
                "' cannot run here; choose 'scalar'", std::string(ff::cpu::isa()) == "avx2"
                ? " or 'avx2'" : " (this CPU or build has no AVX2/FMA/F16C)");
  }
  return ff::cpu::isa();
}

}  // namespace

TORCH_LIBRARY(fisherforget_C, m) {
  m.def("fused_step" FF_FUSED_STEP_SCHEMA);
  m.def("fisher_accumulate" FF_FISHER_ACCUMULATE_SCHEMA);
  m.def("fisher_score" FF_FISHER_SCORE_SCHEMA);
  m.def("build_info() -> str", &build_info);
  m.def("cpu_isa(str? isa=None) -> str", &cpu_isa);
}

TORCH_LIBRARY_IMPL(fisherforget_C, CPU, m) {
  m.impl("fused_step", &ff::binding::fused_step_unboxed<run_fused_step_cpu>);
  m.impl("fisher_accumulate", &fisher_accumulate_cpu);
  m.impl("fisher_score", &fisher_score_cpu);
}
