// The CUDA side of the binding (builds with the CUDA kernels only): runs torch.ops.fisherforget_C
// on CUDA tensors, on the current stream, and, in builds for the tests, registers the ops
// fisherforget_C::emulated_{fused_step,fisher_accumulate,fisher_score}, which run the CUDA
// kernels' own per-thread code on the host, one simulated thread at a time, for CPU tensors: the
// kernel math and the launch tables are tested without a GPU. The checks are binding_checks.h's;
// the tensors are grouped by dtype (the CUDA kernels are templated on it) and handed to the
// torch-free launchers of ff_kernels.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "binding_checks.h"
#include "bindings_cuda.h"
#include "ff_kernels.h"

namespace {

namespace ff = fisherforget;
using ff::binding::Checker;
using ff::binding::StepArgs;
using ff::binding::Target;

ff::ExecTarget exec_target(const Checker& check) {
  ff::ExecTarget target;
  target.emulate_on_host = !check.on_cuda();
  if (check.on_cuda()) {
    target.stream = c10::cuda::getCurrentCUDAStream(check.device.index()).stream();
  }
  return target;
}

// Translates a kernel-side exception into a torch error naming the op.
template <typename Fn>
void run_kernels(const char* op, Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
}

// Indices grouped by a dtype key, groups in order of first appearance (deterministic).
template <typename Key>
std::vector<std::vector<size_t>> group_by(const std::vector<Key>& keys) {
  std::vector<std::vector<size_t>> groups;
  std::vector<Key> group_keys;
  for (size_t i = 0; i < keys.size(); ++i) {
    size_t g = 0;
    while (g < group_keys.size() && !(group_keys[g] == keys[i])) ++g;
    if (g == group_keys.size()) {
      group_keys.push_back(keys[i]);
      groups.emplace_back();
    }
    groups[g].push_back(i);
  }
  return groups;
}

// ------------------------------------------------------------------------------------ fused_step

// The whole op for tensor-list views (at::TensorList from torch.ops, or the Python lists of
// bindings_python.cpp): check, group by dtype, plan the launch tables, launch. With
// launch == false (the host-overhead benchmark) everything but the kernel launches runs.
template <typename Tensors, typename Masks>
void fused_step_views(Target target_kind, bool launch, const StepArgs<Tensors, Masks>& given) {
  Checker check{target_kind == Target::kCuda ? "fisherforget_C::fused_step"
                                             : "fisherforget_C::emulated_fused_step",
                target_kind};
  // Non-contiguous tensors are stepped through contiguous copies, written back after the
  // kernels (stream-ordered), so the Python glue does no per-tensor work.
  check.stage_noncontiguous = true;
  // A CPU lr tensor next to CUDA params is moved once per call (without a host sync); a graph
  // cannot capture that copy and would replay the value seen at capture.
  StepArgs<Tensors, Masks> args = given;
  const std::optional<at::Tensor>& lr = args.scalars.lr_tensor;
  if (target_kind == Target::kCuda && lr.has_value() && lr->defined() && lr->is_cpu() &&
      args.params.size() > 0 && args.params[0].is_cuda()) {
    const at::Device device = args.params[0].device();
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() ==
                    c10::cuda::CaptureStatus::None,
                check.op, ": lr is a CPU tensor, but a CUDA graph is being captured: pass it as a "
                "0-dim tensor on ", device, " (updating it in place between replays)");
    args.scalars.lr_tensor = lr->to(device, /*non_blocking=*/true);
  }
  ff::StepSettings s;
  const std::vector<ff::cpu::StepEntry> table = ff::binding::check_fused_step(check, args, s);
  const size_t n = table.size();
  if (n == 0) return;

  ff::FusedStepProblem base;
  base.settings = s;
  const bool accumulates = s.has_fisher && s.fisher_mode != ff::FisherMode::kNone;

  std::vector<std::tuple<ff::DType, ff::DType, ff::DType>> keys(n);
  for (size_t i = 0; i < n; ++i) {
    keys[i] = std::make_tuple(table[i].param_dtype, table[i].state_dtype, table[i].fisher_dtype);
  }
  std::optional<c10::cuda::CUDAGuard> guard;  // the CUDA tensors' device, for the launches
  if (check.on_cuda()) guard.emplace(check.device);
  ff::ExecTarget target = exec_target(check);
  target.launch = launch;
  for (const std::vector<size_t>& group : group_by(keys)) {
    // Gather this dtype group's pointers into contiguous arrays.
    const size_t m = group.size();
    std::vector<int64_t> numels(m);
    std::vector<void*> g_params(m), g_exp_avgs(m), g_exp_avg_sqs(m), g_max(m), g_fishers(m);
    std::vector<const void*> g_grads(m);
    std::vector<const bool*> g_masks(m);
    std::vector<float*> g_steps(m), g_counts(m);
    for (size_t j = 0; j < m; ++j) {
      const ff::cpu::StepEntry& e = table[group[j]];
      numels[j] = e.numel;
      g_params[j] = e.param;
      g_grads[j] = e.grad;
      g_exp_avgs[j] = e.exp_avg;
      g_exp_avg_sqs[j] = e.exp_avg_sq;
      g_max[j] = e.max_exp_avg_sq;
      g_fishers[j] = e.fisher;
      g_masks[j] = e.mask;
      g_steps[j] = e.step;
      g_counts[j] = e.fisher_count;
    }
    ff::FusedStepProblem problem = base;
    problem.num_tensors = static_cast<int64_t>(m);
    problem.numels = numels.data();
    std::tie(problem.param_dtype, problem.state_dtype, problem.fisher_dtype) = keys[group[0]];
    problem.params = g_params.data();
    problem.grads = g_grads.data();
    problem.exp_avgs = g_exp_avgs.data();
    problem.exp_avg_sqs = g_exp_avg_sqs.data();
    problem.max_exp_avg_sqs = s.amsgrad ? g_max.data() : nullptr;
    problem.fishers = s.has_fisher ? g_fishers.data() : nullptr;
    problem.masks = g_masks.data();
    problem.steps = g_steps.data();
    problem.fisher_counts = accumulates ? g_counts.data() : nullptr;
    run_kernels(check.op, [&] { ff::fused_step(problem, target); });
  }
  check.finish();
}

template <Target kTarget>
void run_fused_step_cuda(const ff::binding::TorchStepArgs& args) {
  fused_step_views(kTarget, /*launch=*/true, args);
}

// ----------------------------------------------------------------------------- fisher_accumulate

template <Target kTarget>
void fisher_accumulate_cuda(at::TensorList fishers, at::TensorList grads, double alpha,
                            double beta, const std::optional<at::Tensor>& grad_scale) {
  Checker check{kTarget == Target::kCuda ? "fisherforget_C::fisher_accumulate"
                                         : "fisherforget_C::emulated_fisher_accumulate",
                kTarget};
  const float* scale = nullptr;
  const std::vector<ff::cpu::AccumulateEntry> table =
      ff::binding::check_fisher_accumulate(check, fishers, grads, grad_scale, &scale);
  if (table.empty()) return;
  std::vector<std::pair<ff::DType, ff::DType>> keys(table.size());
  for (size_t i = 0; i < table.size(); ++i) keys[i] = {table[i].fisher_dtype, table[i].grad_dtype};
  std::optional<c10::cuda::CUDAGuard> guard;  // the CUDA tensors' device, for the launches
  if (check.on_cuda()) guard.emplace(check.device);
  const ff::ExecTarget target = exec_target(check);
  for (const std::vector<size_t>& group : group_by(keys)) {
    std::vector<int64_t> numels;
    std::vector<void*> fisher_ptrs;
    std::vector<const void*> grad_ptrs;
    for (size_t i : group) {
      numels.push_back(table[i].numel);
      fisher_ptrs.push_back(table[i].fisher);
      grad_ptrs.push_back(table[i].grad);
    }
    ff::FisherAccumulateProblem problem;
    problem.num_tensors = static_cast<int64_t>(group.size());
    problem.numels = numels.data();
    std::tie(problem.fisher_dtype, problem.grad_dtype) = keys[group[0]];
    problem.fishers = fisher_ptrs.data();
    problem.grads = grad_ptrs.data();
    problem.alpha = alpha;
    problem.beta = beta;
    problem.grad_scale = scale;
    run_kernels(check.op, [&] { ff::fisher_accumulate(problem, target); });
  }
}

// ---------------------------------------------------------------------------------- fisher_score

template <Target kTarget>
at::Tensor fisher_score_cuda(at::TensorList directions, at::TensorList grads,
                             at::TensorList fishers) {
  Checker check{kTarget == Target::kCuda ? "fisherforget_C::fisher_score"
                                         : "fisherforget_C::emulated_fisher_score",
                kTarget};
  const std::vector<ff::cpu::ScoreEntry> table =
      ff::binding::check_fisher_score(check, directions, grads, fishers);
  if (table.empty()) return at::zeros({2}, at::TensorOptions().dtype(at::kDouble));
  std::vector<std::tuple<ff::DType, ff::DType, ff::DType>> keys(table.size());
  for (size_t i = 0; i < table.size(); ++i) {
    keys[i] = std::make_tuple(table[i].direction_dtype, table[i].grad_dtype,
                              table[i].fisher_dtype);
  }
  std::optional<c10::cuda::CUDAGuard> guard;  // the CUDA tensors' device, for the launches
  if (check.on_cuda()) guard.emplace(check.device);
  const ff::ExecTarget target = exec_target(check);
  const auto groups = group_by(keys);
  std::vector<std::vector<int64_t>> numels(groups.size());
  int64_t total_blocks = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    for (size_t i : groups[g]) numels[g].push_back(table[i].numel);
    total_blocks += ff::fisher_score_num_blocks(static_cast<int64_t>(numels[g].size()),
                                                numels[g].data());
  }
  const auto options = at::TensorOptions().dtype(at::kDouble).device(check.device);
  at::Tensor partials = at::empty({2 * std::max<int64_t>(total_blocks, 1)}, options);
  at::Tensor out = at::empty({2}, options);
  int64_t first_block = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    std::vector<const void*> d_ptrs, g_ptrs, f_ptrs;
    for (size_t i : groups[g]) {
      d_ptrs.push_back(table[i].direction);
      g_ptrs.push_back(table[i].grad);
      f_ptrs.push_back(table[i].fisher);
    }
    ff::FisherScoreProblem problem;
    problem.num_tensors = static_cast<int64_t>(groups[g].size());
    problem.numels = numels[g].data();
    std::tie(problem.direction_dtype, problem.grad_dtype, problem.fisher_dtype) =
        keys[groups[g][0]];
    problem.directions = d_ptrs.data();
    problem.grads = g_ptrs.data();
    problem.fishers = f_ptrs.data();
    problem.partials = partials.data_ptr<double>();
    problem.first_block = first_block;
    run_kernels(check.op, [&] { ff::fisher_score_partials(problem, target); });
    first_block += ff::fisher_score_num_blocks(problem.num_tensors, problem.numels);
  }
  run_kernels(check.op, [&] {
    ff::fisher_score_finalize(partials.data_ptr<double>(), total_blocks, out.data_ptr<double>(),
                              target);
  });
  return out;
}

}  // namespace

namespace fisherforget {
namespace binding {

void fused_step_from_python(bool launch, const PythonStepArgs& args) {
  fused_step_views(launch ? Target::kCuda : Target::kEmulation, launch, args);
}

}  // namespace binding
}  // namespace fisherforget

TORCH_LIBRARY_IMPL(fisherforget_C, CUDA, m) {
  m.impl("fused_step", &ff::binding::fused_step_unboxed<run_fused_step_cuda<Target::kCuda>>);
  m.impl("fisher_accumulate", &fisher_accumulate_cuda<Target::kCuda>);
  m.impl("fisher_score", &fisher_score_cuda<Target::kCuda>);
}

#ifdef FISHERFORGET_TEST_OPS
// Test-only (FISHERFORGET_TEST_OPS=1, `make install`; a user's build has none): the CUDA kernels'
// code emulated on the host for CPU tensors (same schemas).
TORCH_LIBRARY_FRAGMENT(fisherforget_C, m) {
  m.def("emulated_fused_step" FF_FUSED_STEP_SCHEMA);
  m.def("emulated_fisher_accumulate" FF_FISHER_ACCUMULATE_SCHEMA);
  m.def("emulated_fisher_score" FF_FISHER_SCORE_SCHEMA);
}

TORCH_LIBRARY_IMPL(fisherforget_C, CPU, m) {
  m.impl("emulated_fused_step",
         &ff::binding::fused_step_unboxed<run_fused_step_cuda<Target::kEmulation>>);
  m.impl("emulated_fisher_accumulate", &fisher_accumulate_cuda<Target::kEmulation>);
  m.impl("emulated_fisher_score", &fisher_score_cuda<Target::kEmulation>);
}
#endif  // FISHERFORGET_TEST_OPS
