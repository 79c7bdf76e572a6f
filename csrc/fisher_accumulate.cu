// fisher_accumulate: F = alpha * F + beta * (g / grad_scale)^2 over many tensors, in fp32.
#include "ff_common.cuh"
#include "ff_tensor_table.h"

namespace fisherforget {

using AccumulateTable = TensorTable<kAccFields, kParamBytes>;

struct AccumulateArgs {
  const float* grad_scale;
  float alpha, beta;  // Python floats enter the reference's fp32 ops rounded to fp32
  AccumulateTable table;
};
static_assert(sizeof(AccumulateArgs) <= kParamBytes, "fisher_accumulate kernel argument too large");

template <typename F, typename G>
struct AccumulateThread {
  static constexpr int kPacket =
      packet_elems(static_cast<int>(sizeof(F) > sizeof(G) ? sizeof(F) : sizeof(G)));

  FF_HD static float value(const AccumulateArgs& a, float scale, float fisher, float grad) {
    float g = grad;
    if (a.grad_scale != nullptr) g = math::div(g, scale);
    return math::add(math::mul(a.alpha, fisher), math::mul(a.beta, math::mul(g, g)));
  }

  // This thread's share of launch chunk `chunk` (tensor searched from slot lo on); returns the
  // slot. Whole tiles with packet accesses when aligned, then element by element.
  FF_HD static int run(const AccumulateArgs& a, int64_t chunk, int lo, int thread) {
    const AccumulateTable& table = a.table;
    const int slot = table.find(chunk, lo);
    const int64_t start = (chunk - table.first_chunk(slot)) * kChunkSize;
    const int64_t remaining = table.numel(slot) - start;
    const int64_t n = remaining < kChunkSize ? remaining : kChunkSize;
    F* fisher = static_cast<F*>(table.address(kAccFisher, slot)) + start;
    const G* grad = static_cast<const G*>(table.address(kAccGrad, slot)) + start;
    const float scale = a.grad_scale != nullptr ? *a.grad_scale : 1.0f;
    int64_t first_scalar = 0;
    if (aligned_to(fisher, sizeof(F) * kPacket) && aligned_to(grad, sizeof(G) * kPacket)) {
      const int64_t tiles = n / kTile;
      for (int64_t base = 0; base < tiles * kTile; base += kTile) {
        const Vec8<F> f = load_tile<kPacket>(fisher + base, thread);
        const Vec8<G> g = load_tile<kPacket>(grad + base, thread);
        Vec8<F> out;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          out.v[k] = from_float<F>(value(a, scale, to_float(f.v[k]), to_float(g.v[k])));
        }
        store_tile<kPacket>(fisher + base, thread, out);
      }
      first_scalar = tiles * kTile;
    }
    for (int64_t i = first_scalar + thread; i < n; i += kBlockSize) {
      fisher[i] = from_float<F>(value(a, scale, to_float(fisher[i]), to_float(grad[i])));
    }
    return slot;
  }
};

// Block b takes chunks b, b + gridDim.x, ... of the launch.
template <typename F, typename G>
__global__ void __launch_bounds__(kBlockSize)
    fisher_accumulate_kernel(const __grid_constant__ AccumulateArgs args) {
  int slot = 0;
  for (int64_t chunk = blockIdx.x; chunk < args.table.num_chunks; chunk += gridDim.x) {
    slot = AccumulateThread<F, G>::run(args, chunk, slot, static_cast<int>(threadIdx.x));
  }
}

template <typename F, typename G>
void run_fisher_accumulate(const FisherAccumulateProblem& problem, const ExecTarget& target) {
  check_table_numels("fisher_accumulate", problem.num_tensors, problem.numels);
  AccumulateArgs args;
  args.grad_scale = problem.grad_scale;
  args.alpha = static_cast<float>(problem.alpha);
  args.beta = static_cast<float>(problem.beta);
  static std::atomic<int> resident[kMaxCachedDevices];
  const int max_grid = target.emulate_on_host
      ? kEmulatedResidentBlocks : resident_blocks(fisher_accumulate_kernel<F, G>, resident);
  const bool present[kAccFields] = {true, true};
  const auto get = [&](int64_t i, const void* (&a)[kAccFields]) {
    a[kAccFisher] = problem.fishers[i];
    a[kAccGrad] = problem.grads[i];
  };
  plan_table_launches(args.table, present, problem.num_tensors, problem.numels, get,
                      [&](const AccumulateTable& table) {
    const int grid = grid_blocks(table.num_chunks, max_grid);
    if (target.emulate_on_host) {
      for (int block = 0; block < grid; ++block) {
        for (int thread = 0; thread < kBlockSize; ++thread) {
          int slot = 0;
          for (int64_t chunk = block; chunk < table.num_chunks; chunk += grid) {
            slot = AccumulateThread<F, G>::run(args, chunk, slot, thread);
          }
        }
      }
    } else {
      fisher_accumulate_kernel<F, G><<<grid, kBlockSize, 0, as_stream(target)>>>(args);
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
