// fisher_accumulate: F = alpha * F + beta * (g / grad_scale)^2 over many tensors, in fp32.
#include "ff_common.cuh"
#include "ff_tensor_table.h"

namespace fisherforget {

struct AccumulateTensor {
  void* fisher;
  const void* grad;
  int64_t numel;
};

constexpr int kAccumulateMaxTensors = 96;
constexpr int kAccumulateMaxBlocks = 320;

struct AccumulateArgs {
  const float* grad_scale;
  float alpha, beta;  // Python floats enter the reference's fp32 ops rounded to fp32
  AccumulateTensor tensors[kAccumulateMaxTensors];
  int32_t block_chunk[kAccumulateMaxBlocks];
  uint8_t block_slot[kAccumulateMaxBlocks];
};
static_assert(sizeof(AccumulateArgs) <= 4000, "fisher_accumulate kernel argument exceeds 4 KB");

template <typename F, typename G>
struct AccumulateThread {
  FF_HD static float value(const AccumulateArgs& a, float scale, float fisher, float grad) {
    float g = grad;
    if (a.grad_scale != nullptr) g = div_rn(g, scale);
    return add_rn(mul_rn(a.alpha, fisher), mul_rn(a.beta, mul_rn(g, g)));
  }

  FF_HD static void run(const AccumulateArgs& a, int block, int thread, int num_threads) {
    const AccumulateTensor& t = a.tensors[a.block_slot[block]];
    const int64_t start = static_cast<int64_t>(a.block_chunk[block]) * kChunkSize;
    const int64_t remaining = t.numel - start;
    const int n = static_cast<int>(remaining < kChunkSize ? remaining : kChunkSize);
    F* fisher = static_cast<F*>(t.fisher) + start;
    const G* grad = static_cast<const G*>(t.grad) + start;
    const float scale = a.grad_scale != nullptr ? *a.grad_scale : 1.0f;
    int first_scalar = 0;
    if (aligned_to(fisher, 16) && aligned_to(grad, 16)) {
      const int groups = n / kVec;
      for (int group = thread; group < groups; group += num_threads) {
        const int64_t i = static_cast<int64_t>(group) * kVec;
        const Vec8<F> f = load_vec(fisher + i);
        const Vec8<G> g = load_vec(grad + i);
        Vec8<F> out;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          out.v[k] = from_float<F>(value(a, scale, to_float(f.v[k]), to_float(g.v[k])));
        }
        store_vec(fisher + i, out);
      }
      first_scalar = groups * kVec;
    }
    for (int i = first_scalar + thread; i < n; i += num_threads) {
      fisher[i] = from_float<F>(value(a, scale, to_float(fisher[i]), to_float(grad[i])));
    }
  }
};

template <typename F, typename G>
__global__ void __launch_bounds__(kBlockSize)
    fisher_accumulate_kernel(const __grid_constant__ AccumulateArgs args) {
  AccumulateThread<F, G>::run(args, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename F, typename G>
void run_fisher_accumulate(const FisherAccumulateProblem& problem, const ExecTarget& target) {
  AccumulateArgs args;
  args.grad_scale = problem.grad_scale;
  args.alpha = static_cast<float>(problem.alpha);
  args.beta = static_cast<float>(problem.beta);
  plan_launches<kAccumulateMaxTensors, kAccumulateMaxBlocks>(
      problem.num_tensors, problem.numels, kChunkSize, [&](const auto& plan) {
        for (int slot = 0; slot < plan.num_slots; ++slot) {
          const int64_t i = plan.slot_tensor[slot];
          args.tensors[slot] = AccumulateTensor{problem.fishers[i], problem.grads[i],
                                                problem.numels[i]};
        }
        for (int b = 0; b < plan.num_blocks; ++b) {
          args.block_slot[b] = plan.block_slot[b];
          args.block_chunk[b] = plan.block_chunk[b];
        }
        if (target.emulate_on_host) {
          for (int b = 0; b < plan.num_blocks; ++b) {
            for (int thread = 0; thread < kBlockSize; ++thread) {
              AccumulateThread<F, G>::run(args, b, thread, kBlockSize);
            }
          }
        } else {
          fisher_accumulate_kernel<F, G>
              <<<plan.num_blocks, kBlockSize, 0, as_stream(target)>>>(args);
          check_launch("fisher_accumulate");
        }
      });
}

template <typename F>
void dispatch_grad(const FisherAccumulateProblem& problem, const ExecTarget& target) {
  switch (problem.grad_dtype) {
    case DType::kFloat32:
      return run_fisher_accumulate<F, float>(problem, target);
    case DType::kBFloat16:
      return run_fisher_accumulate<F, __nv_bfloat16>(problem, target);
    case DType::kFloat16:
      return run_fisher_accumulate<F, __half>(problem, target);
  }
  throw std::invalid_argument("fisher_accumulate: unsupported grad dtype");
}

void fisher_accumulate(const FisherAccumulateProblem& problem, const ExecTarget& target) {
  if (problem.num_tensors == 0) return;
  switch (problem.fisher_dtype) {
    case DType::kFloat32:
      return dispatch_grad<float>(problem, target);
    case DType::kBFloat16:
      return dispatch_grad<__nv_bfloat16>(problem, target);
    default:
      throw std::invalid_argument(std::string("fisher_accumulate: unsupported fisher dtype ") +
                                  dtype_name(problem.fisher_dtype));
  }
}

}  // namespace fisherforget
