// fused_step: the step/Fisher count increments and the dtype dispatch.
// The kernel template is in fused_step.cuh, instantiated in fused_step_{f32,bf16,f16}.cu.
#include "fused_step.cuh"

#define FF_STRINGIFY_INNER(...) #__VA_ARGS__
#define FF_STRINGIFY(...) FF_STRINGIFY_INNER(__VA_ARGS__)

namespace fisherforget {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat16:
      return "float16";
  }
  return "unknown";
}

const char* compiled_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return FF_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

int compiled_cuda_version() { return CUDART_VERSION; }

void check_table_numels(const char* op, int64_t num_tensors, const int64_t* numels) {
  for (int64_t i = 0; i < num_tensors; ++i) {
    if (numels[i] > kMaxTableNumel) {
      throw std::invalid_argument(std::string(op) + ": tensor " + std::to_string(i) + " has " +
                                  std::to_string(numels[i]) + " elements; at most 2^40 - 1 are " +
                                  "supported per tensor");
    }
  }
}

// One thread per tensor; as many tensors per launch as the kernel argument holds (2,040).
constexpr int kCountArgHeader = 16;
constexpr int kCountMaxTensors = (kParamBytes - kCountArgHeader) / (2 * sizeof(float*));

struct CountArgs {
  const float* found_inf;
  int32_t num_tensors;
  bool has_fisher_counts;
  float* steps[kCountMaxTensors];
  float* fisher_counts[kCountMaxTensors];
};
static_assert(sizeof(CountArgs) <= kParamBytes, "advance_counts kernel argument too large");

FF_HD void advance_one(const CountArgs& a, int i) {
  if (i >= a.num_tensors) return;
  if (a.found_inf != nullptr && *a.found_inf > 0.0f) return;
  *a.steps[i] = math::add(*a.steps[i], 1.0f);
  if (a.has_fisher_counts) *a.fisher_counts[i] = math::add(*a.fisher_counts[i], 1.0f);
}

__global__ void __launch_bounds__(kBlockSize) advance_counts_kernel(const __grid_constant__ CountArgs args) {
  advance_one(args, static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x));
}

void advance_other_counts(const FusedStepProblem& problem, const ExecTarget& target) {
  CountArgs args;
  args.found_inf = problem.settings.found_inf;
  args.has_fisher_counts =
      problem.fishers != nullptr && problem.settings.fisher_mode != FisherMode::kNone;
  args.num_tensors = 0;
  const auto launch = [&] {
    if (!target.launch) {
      // planned only
    } else if (target.emulate_on_host) {
      for (int i = 0; i < args.num_tensors; ++i) advance_one(args, i);
    } else {
      const int blocks = (args.num_tensors + kBlockSize - 1) / kBlockSize;
      advance_counts_kernel<<<blocks, kBlockSize, 0, as_stream(target)>>>(args);
      check_launch("fused_step: advance_counts");
    }
    args.num_tensors = 0;
  };
  for (int64_t i = 0; i < problem.num_tensors; ++i) {
    // The step kernel advanced the counts of every single-chunk tensor itself.
    if (num_chunks(problem.numels[i], kChunkSize) == 1) continue;
    args.steps[args.num_tensors] = problem.steps[i];
    args.fisher_counts[args.num_tensors] =
        args.has_fisher_counts ? problem.fisher_counts[i] : nullptr;
    if (++args.num_tensors == kCountMaxTensors) launch();
  }
  if (args.num_tensors > 0) launch();
}

void fused_step(const FusedStepProblem& problem, const ExecTarget& target) {
  if (problem.num_tensors == 0) return;
  switch (problem.param_dtype) {
    case DType::kFloat32:
      return fused_step_f32(problem, target);
    case DType::kBFloat16:
      return fused_step_bf16(problem, target);
    case DType::kFloat16:
      return fused_step_f16(problem, target);
  }
  throw std::invalid_argument("fused_step: unsupported param dtype");
}

}  // namespace fisherforget
