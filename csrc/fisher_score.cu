// fisher_score: [sum <d, g>, sum F g^2] over many tensors, in float64, deterministically:
// each chunk is reduced in a fixed tree order into its own partial (whichever block takes it),
// and one final block sums the partials in a fixed order. No float atomics anywhere, and the
// result does not depend on the grid: the same bits on any GPU and in the host emulation.
#include "ff_common.cuh"
#include "ff_tensor_table.h"

namespace fisherforget {

using ScoreTable = TensorTable<kScoreFields, kParamBytes>;

struct ScoreArgs {
  double* partials;
  int64_t first_partial;  // partial index of this launch's first chunk
  ScoreTable table;
};
static_assert(sizeof(ScoreArgs) <= kParamBytes, "fisher_score kernel argument too large");

struct ScorePartial {
  double dot;       // sum d * g
  double weighted;  // sum F * g * g
};

// Rounded multiplies and adds (no contraction: nvcc would fuse them into DFMAs, the host would
// not), so each partial has the same bits on the GPU and in the emulation.
FF_HD void add_element(ScorePartial& acc, float d, float g, float f) {
  const double gd = g;
  acc.dot = math::add(acc.dot, math::mul(static_cast<double>(d), gd));
  acc.weighted = math::add(acc.weighted, math::mul(math::mul(static_cast<double>(f), gd), gd));
}

template <typename D, typename G, typename F>
struct ScoreThread {
  static constexpr int kPacket = packet_elems(static_cast<int>(
      sizeof(D) > sizeof(G) ? (sizeof(D) > sizeof(F) ? sizeof(D) : sizeof(F))
                            : (sizeof(G) > sizeof(F) ? sizeof(G) : sizeof(F))));

  // This thread's partial over its elements of launch chunk `chunk`, in a fixed order; `slot`
  // is the previous chunk's slot on entry (the search starts there) and this one's on return.
  FF_HD static ScorePartial run(const ScoreArgs& a, int64_t chunk, int& slot, int thread) {
    const ScoreTable& table = a.table;
    slot = table.find(chunk, slot);
    const int64_t start = (chunk - table.first_chunk(slot)) * kChunkSize;
    const int64_t remaining = table.numel(slot) - start;
    const int64_t n = remaining < kChunkSize ? remaining : kChunkSize;
    const D* direction = static_cast<const D*>(table.address(kScoreDirection, slot)) + start;
    const G* grad = static_cast<const G*>(table.address(kScoreGrad, slot)) + start;
    const F* fisher = static_cast<const F*>(table.address(kScoreFisher, slot)) + start;
    ScorePartial acc{0.0, 0.0};
    int64_t first_scalar = 0;
    if (aligned_to(direction, sizeof(D) * kPacket) && aligned_to(grad, sizeof(G) * kPacket) &&
        aligned_to(fisher, sizeof(F) * kPacket)) {
      const int64_t tiles = n / kTile;
      for (int64_t base = 0; base < tiles * kTile; base += kTile) {
        const Vec8<D> d = load_tile<kPacket>(direction + base, thread);
        const Vec8<G> g = load_tile<kPacket>(grad + base, thread);
        const Vec8<F> f = load_tile<kPacket>(fisher + base, thread);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          add_element(acc, to_float(d.v[k]), to_float(g.v[k]), to_float(f.v[k]));
        }
      }
      first_scalar = tiles * kTile;
    }
    for (int64_t i = first_scalar + thread; i < n; i += kBlockSize) {
      add_element(acc, to_float(direction[i]), to_float(grad[i]), to_float(fisher[i]));
    }
    return acc;
  }
};

// Pairwise tree over kBlockSize values: values[0] ends up holding the sum. The host emulation
// runs the same levels in the same order, so host and device partials agree bit for bit.
FF_HD void tree_level(ScorePartial* values, int thread, int stride) {
  if (thread < stride) {
    values[thread].dot = math::add(values[thread].dot, values[thread + stride].dot);
    values[thread].weighted = math::add(values[thread].weighted, values[thread + stride].weighted);
  }
}

// Block b takes chunks b, b + gridDim.x, ... of the launch; each chunk gets its own partial.
template <typename D, typename G, typename F>
__global__ void __launch_bounds__(kBlockSize)
    fisher_score_kernel(const __grid_constant__ ScoreArgs args) {
  __shared__ ScorePartial values[kBlockSize];
  int slot = 0;
  for (int64_t chunk = blockIdx.x; chunk < args.table.num_chunks; chunk += gridDim.x) {
    values[threadIdx.x] = ScoreThread<D, G, F>::run(args, chunk, slot, threadIdx.x);
    __syncthreads();
    for (int stride = kBlockSize / 2; stride > 0; stride >>= 1) {
      tree_level(values, threadIdx.x, stride);
      __syncthreads();
    }
    // Only thread 0 reads values[0], and only thread 0 writes it in the next iteration; the
    // other slots were last read before the final barrier above.
    if (threadIdx.x == 0) {
      double* out = args.partials + 2 * (args.first_partial + chunk);
      out[0] = values[0].dot;
      out[1] = values[0].weighted;
    }
  }
}

template <typename D, typename G, typename F>
void run_fisher_score(const FisherScoreProblem& problem, const ExecTarget& target) {
  check_table_numels("fisher_score", problem.num_tensors, problem.numels);
  ScoreArgs args;
  args.partials = problem.partials;
  args.first_partial = problem.first_block;
  static std::atomic<int> resident[kMaxCachedDevices];
  const int max_grid = target.emulate_on_host
      ? kEmulatedResidentBlocks : resident_blocks(fisher_score_kernel<D, G, F>, resident);
  const bool present[kScoreFields] = {true, true, true};
  const auto get = [&](int64_t i, const void* (&a)[kScoreFields]) {
    a[kScoreDirection] = problem.directions[i];
    a[kScoreGrad] = problem.grads[i];
    a[kScoreFisher] = problem.fishers[i];
  };
  plan_table_launches(args.table, present, problem.num_tensors, problem.numels, get,
                      [&](const ScoreTable& table) {
    const int grid = grid_blocks(table.num_chunks, max_grid);
    if (target.emulate_on_host) {
      ScorePartial values[kBlockSize];
      for (int block = 0; block < grid; ++block) {
        int slot = 0;
        for (int64_t chunk = block; chunk < table.num_chunks; chunk += grid) {
          int thread_slot = slot;
          for (int thread = 0; thread < kBlockSize; ++thread) {
            thread_slot = slot;
            values[thread] = ScoreThread<D, G, F>::run(args, chunk, thread_slot, thread);
          }
          slot = thread_slot;
          for (int stride = kBlockSize / 2; stride > 0; stride >>= 1) {
            for (int thread = 0; thread < kBlockSize; ++thread) tree_level(values, thread, stride);
          }
          double* out = args.partials + 2 * (args.first_partial + chunk);
          out[0] = values[0].dot;
          out[1] = values[0].weighted;
        }
      }
    } else {
      fisher_score_kernel<D, G, F><<<grid, kBlockSize, 0, as_stream(target)>>>(args);
      check_launch("fisher_score");
    }
    args.first_partial += table.num_chunks;
  });
}

FF_HD ScorePartial finalize_thread(const double* partials, int64_t num_blocks, int thread,
                                   int num_threads) {
  ScorePartial acc{0.0, 0.0};
  for (int64_t b = thread; b < num_blocks; b += num_threads) {
    acc.dot = math::add(acc.dot, partials[2 * b]);
    acc.weighted = math::add(acc.weighted, partials[2 * b + 1]);
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
