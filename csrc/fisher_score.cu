// fisher_score: [sum <d, g>, sum F g^2] over many tensors, in float64, deterministically:
// each block reduces its chunk in a fixed tree order into its own partial, and one final block sums
// the partials in a fixed order. No float atomics anywhere.
#include "ff_common.cuh"
#include "ff_tensor_table.h"

namespace fisherforget {

struct ScoreTensor {
  const void* direction;
  const void* grad;
  const void* fisher;
  int64_t numel;
};

constexpr int kScoreMaxTensors = 64;
constexpr int kScoreMaxBlocks = 320;

struct ScoreArgs {
  double* partials;
  int64_t first_block;
  ScoreTensor tensors[kScoreMaxTensors];
  int32_t block_chunk[kScoreMaxBlocks];
  uint8_t block_slot[kScoreMaxBlocks];
};
static_assert(sizeof(ScoreArgs) <= 4000, "fisher_score kernel argument exceeds 4 KB");

struct ScorePartial {
  double dot;       // sum d * g
  double weighted;  // sum F * g * g
};

FF_HD void add_element(ScorePartial& acc, float d, float g, float f) {
  const double gd = g;
  acc.dot += static_cast<double>(d) * gd;
  acc.weighted += (static_cast<double>(f) * gd) * gd;
}

template <typename D, typename G, typename F>
struct ScoreThread {
  // This thread's partial over its elements of the block's chunk, in a fixed order.
  FF_HD static ScorePartial run(const ScoreArgs& a, int block, int thread, int num_threads) {
    const ScoreTensor& t = a.tensors[a.block_slot[block]];
    const int64_t start = static_cast<int64_t>(a.block_chunk[block]) * kChunkSize;
    const int64_t remaining = t.numel - start;
    const int n = static_cast<int>(remaining < kChunkSize ? remaining : kChunkSize);
    const D* direction = static_cast<const D*>(t.direction) + start;
    const G* grad = static_cast<const G*>(t.grad) + start;
    const F* fisher = static_cast<const F*>(t.fisher) + start;
    ScorePartial acc{0.0, 0.0};
    int first_scalar = 0;
    if (aligned_to(direction, 16) && aligned_to(grad, 16) && aligned_to(fisher, 16)) {
      const int groups = n / kVec;
      for (int group = thread; group < groups; group += num_threads) {
        const int64_t i = static_cast<int64_t>(group) * kVec;
        const Vec8<D> d = load_vec(direction + i);
        const Vec8<G> g = load_vec(grad + i);
        const Vec8<F> f = load_vec(fisher + i);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          add_element(acc, to_float(d.v[k]), to_float(g.v[k]), to_float(f.v[k]));
        }
      }
      first_scalar = groups * kVec;
    }
    for (int i = first_scalar + thread; i < n; i += num_threads) {
      add_element(acc, to_float(direction[i]), to_float(grad[i]), to_float(fisher[i]));
    }
    return acc;
  }
};

// Pairwise tree over kBlockSize values: values[0] ends up holding the sum. The host emulation
// runs the same levels in the same order, so host and device partials agree bit for bit.
FF_HD void tree_level(ScorePartial* values, int thread, int stride) {
  if (thread < stride) {
    values[thread].dot += values[thread + stride].dot;
    values[thread].weighted += values[thread + stride].weighted;
  }
}

template <typename D, typename G, typename F>
__global__ void __launch_bounds__(kBlockSize)
    fisher_score_kernel(const __grid_constant__ ScoreArgs args) {
  __shared__ ScorePartial values[kBlockSize];
  values[threadIdx.x] = ScoreThread<D, G, F>::run(args, blockIdx.x, threadIdx.x, blockDim.x);
  __syncthreads();
  for (int stride = kBlockSize / 2; stride > 0; stride >>= 1) {
    tree_level(values, threadIdx.x, stride);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double* out = args.partials + 2 * (args.first_block + blockIdx.x);
    out[0] = values[0].dot;
    out[1] = values[0].weighted;
  }
}

template <typename D, typename G, typename F>
void run_fisher_score(const FisherScoreProblem& problem, const ExecTarget& target) {
  ScoreArgs args;
  args.partials = problem.partials;
  args.first_block = problem.first_block;
  plan_launches<kScoreMaxTensors, kScoreMaxBlocks>(
      problem.num_tensors, problem.numels, kChunkSize, [&](const auto& plan) {
        for (int slot = 0; slot < plan.num_slots; ++slot) {
          const int64_t i = plan.slot_tensor[slot];
          args.tensors[slot] = ScoreTensor{problem.directions[i], problem.grads[i],
                                           problem.fishers[i], problem.numels[i]};
        }
        for (int b = 0; b < plan.num_blocks; ++b) {
          args.block_slot[b] = plan.block_slot[b];
          args.block_chunk[b] = plan.block_chunk[b];
        }
        if (target.emulate_on_host) {
          ScorePartial values[kBlockSize];
          for (int b = 0; b < plan.num_blocks; ++b) {
            for (int thread = 0; thread < kBlockSize; ++thread) {
              values[thread] = ScoreThread<D, G, F>::run(args, b, thread, kBlockSize);
            }
            for (int stride = kBlockSize / 2; stride > 0; stride >>= 1) {
              for (int thread = 0; thread < kBlockSize; ++thread) tree_level(values, thread, stride);
            }
            double* out = args.partials + 2 * (args.first_block + b);
            out[0] = values[0].dot;
            out[1] = values[0].weighted;
          }
        } else {
          fisher_score_kernel<D, G, F>
              <<<plan.num_blocks, kBlockSize, 0, as_stream(target)>>>(args);
          check_launch("fisher_score");
        }
        args.first_block += plan.num_blocks;
      });
}

FF_HD ScorePartial finalize_thread(const double* partials, int64_t num_blocks, int thread,
                                   int num_threads) {
  ScorePartial acc{0.0, 0.0};
  for (int64_t b = thread; b < num_blocks; b += num_threads) {
    acc.dot += partials[2 * b];
    acc.weighted += partials[2 * b + 1];
  }
  return acc;
}

__global__ void __launch_bounds__(kBlockSize)
    fisher_score_finalize_kernel(const double* partials, int64_t num_blocks, double* out) {
  __shared__ ScorePartial values[kBlockSize];
  values[threadIdx.x] = finalize_thread(partials, num_blocks, threadIdx.x, blockDim.x);
  __syncthreads();
  for (int stride = kBlockSize / 2; stride > 0; stride >>= 1) {
    tree_level(values, threadIdx.x, stride);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[0] = values[0].dot;
    out[1] = values[0].weighted;
  }
}

int64_t fisher_score_num_blocks(int64_t num_tensors, const int64_t* numels) {
  int64_t blocks = 0;
  for (int64_t i = 0; i < num_tensors; ++i) {
    if (numels[i] > 0) blocks += num_chunks(numels[i], kChunkSize);
  }
  return blocks;
}

void fisher_score_finalize(const double* partials, int64_t num_blocks, double* out,
                           const ExecTarget& target) {
  if (target.emulate_on_host) {
    ScorePartial values[kBlockSize];
    for (int thread = 0; thread < kBlockSize; ++thread) {
      values[thread] = finalize_thread(partials, num_blocks, thread, kBlockSize);
    }
    for (int stride = kBlockSize / 2; stride > 0; stride >>= 1) {
      for (int thread = 0; thread < kBlockSize; ++thread) tree_level(values, thread, stride);
    }
    out[0] = values[0].dot;
    out[1] = values[0].weighted;
    return;
  }
  fisher_score_finalize_kernel<<<1, kBlockSize, 0, as_stream(target)>>>(partials, num_blocks, out);
  check_launch("fisher_score: finalize");
}

template <typename D, typename G>
void dispatch_fisher(const FisherScoreProblem& problem, const ExecTarget& target) {
  switch (problem.fisher_dtype) {
    case DType::kFloat32:
      return run_fisher_score<D, G, float>(problem, target);
    case DType::kBFloat16:
      return run_fisher_score<D, G, __nv_bfloat16>(problem, target);
    default:
      throw std::invalid_argument(std::string("fisher_score: unsupported fisher dtype ") +
                                  dtype_name(problem.fisher_dtype));
  }
}

template <typename D>
void dispatch_grad(const FisherScoreProblem& problem, const ExecTarget& target) {
  switch (problem.grad_dtype) {
    case DType::kFloat32:
      return dispatch_fisher<D, float>(problem, target);
    case DType::kBFloat16:
      return dispatch_fisher<D, __nv_bfloat16>(problem, target);
    case DType::kFloat16:
      return dispatch_fisher<D, __half>(problem, target);
  }
  throw std::invalid_argument("fisher_score: unsupported grad dtype");
}

void fisher_score_partials(const FisherScoreProblem& problem, const ExecTarget& target) {
  if (problem.num_tensors == 0) return;
  switch (problem.direction_dtype) {
    case DType::kFloat32:
      return dispatch_grad<float>(problem, target);
    case DType::kBFloat16:
      return dispatch_grad<__nv_bfloat16>(problem, target);
    case DType::kFloat16:
      return dispatch_grad<__half>(problem, target);
  }
  throw std::invalid_argument("fisher_score: unsupported direction dtype");
}

}  // namespace fisherforget
