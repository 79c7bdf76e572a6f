// The fused Fisher-AdamW step: kernel template, launcher and host emulation.
// Instantiated per param dtype in fused_step_{f32,bf16,f16}.cu (bounds compile time per file).
#pragma once

#include "ff_common.cuh"
#include "ff_tensor_table.h"

namespace fisherforget {

// One tensor's operands as a block sees them (read from the launch's table).
struct StepTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* fisher;
  const bool* mask;
  const float* step;
  const float* fisher_count;
  int64_t numel;
  int64_t first;  // the position in the tensor of the element the pointers point at
};

// Hyperparameters of one call, pre-rounded exactly as the reference backend rounds them: a Python
// float multiplied into an fp32 tensor is rounded to fp32 first, so those are stored as floats.
struct StepScalars {
  double lr;               // LrKind::kHost
  const void* lr_tensor;   // other kinds
  const float* grad_scale;
  const float* found_inf;
  double beta1, beta2;     // bias corrections are computed in double
  double weight_decay;     // for a float64 lr tensor
  StepCallScalars k;       // the per-call constants, shared with the CPU kernels
  int lr_kind;
  int fisher_mode;
  bool has_fisher, apply_fisher_scale, amsgrad, maximize, has_freeze_above, has_freeze_below;
};

using StepTable = TensorTable<kStepFields, kParamBytes>;

struct FusedStepArgs {
  StepScalars s;
  StepTable table;
};
static_assert(sizeof(StepScalars) <= kScalarsReserve, "StepScalars outgrew its reserve");
static_assert(sizeof(FusedStepArgs) <= kParamBytes, "fused_step kernel argument too large");

// Blocks per SM the step kernel is compiled for: 2 x 256 threads leaves up to 128 registers per
// thread (the kernel branches at run time on amsgrad, the Fisher, masks and freezing), and
// 512 threads x 10 packets of 16 bytes in flight per SM is several times what the memory
// latency needs. To be tuned on a GPU (docs/cuda.md).
constexpr int kStepMinBlocksPerSm = 2;

// Scalars shared by every element of one block (one tensor, one chunk).
struct StepBlockConsts {
  float decay;      // 1 - lr * weight_decay in fp32 (fp64 for a float64 lr tensor)
  float step_size;  // (float)(lr / (1 - beta1^t))
  float bias_correction2_sqrt;  // (float)sqrt(1 - beta2^t)
  float fisher_a, fisher_b;
  float grad_scale;  // *StepScalars::grad_scale, loaded once per thread (1 when absent)
  uint32_t fisher_key;  // math::fisher_key(count after this step): a bf16 Fisher's random bits
};

FF_HD StepBlockConsts step_block_consts(const StepScalars& s, const StepTensor& t) {
  StepBlockConsts c;
  // The step count is incremented after the kernel (by increment_counts): t = step + 1 here.
  const double step = static_cast<double>(math::add(*t.step, 1.0f));
  const double bias_correction1 = 1.0 - ::pow(s.beta1, step);
  const double bias_correction2_sqrt = ::sqrt(1.0 - ::pow(s.beta2, step));
  double lr = s.lr;
  switch (s.lr_kind) {
    case static_cast<int>(LrKind::kFloat32): {
      const float value = *static_cast<const float*>(s.lr_tensor);
      lr = value;
      c.decay = math::sub(1.0f, math::mul(value, s.k.weight_decay));
      break;
    }
    case static_cast<int>(LrKind::kFloat64): {
      const double value = *static_cast<const double*>(s.lr_tensor);
      lr = value;
      c.decay = static_cast<float>(dsub_rn(1.0, dmul_rn(value, s.weight_decay)));
      break;
    }
    case static_cast<int>(LrKind::kBFloat16): {
      const float value = to_float(*static_cast<const __nv_bfloat16*>(s.lr_tensor));
      lr = value;
      c.decay = math::sub(1.0f, math::mul(value, s.k.weight_decay));  // widened: fp32 math
      break;
    }
    case static_cast<int>(LrKind::kFloat16): {
      const float value = to_float(*static_cast<const __half*>(s.lr_tensor));
      lr = value;
      c.decay = math::sub(1.0f, math::mul(value, s.k.weight_decay));  // widened: fp32 math
      break;
    }
    default:
      c.decay = s.k.decay_host;
  }
  c.step_size = static_cast<float>(lr / bias_correction1);
  c.bias_correction2_sqrt = static_cast<float>(bias_correction2_sqrt);
  c.fisher_a = s.k.fisher_a;
  c.fisher_b = s.k.fisher_b;
  c.grad_scale = s.grad_scale != nullptr ? *s.grad_scale : 1.0f;
  c.fisher_key = t.fisher_count != nullptr ? math::fisher_key(math::add(*t.fisher_count, 1.0f))
                                           : 0u;
  if (s.fisher_mode == static_cast<int>(FisherMode::kMean)) {
    // n = count + 1 accumulations including this one: F = (n-1)/n * F + 1/n * g^2.
    const float n = math::add(*t.fisher_count, 1.0f);
    c.fisher_a = math::div(math::sub(n, 1.0f), n);
    c.fisher_b = math::div(1.0f, n);
  }
  return c;
}

// One element: the step of docs/design.md, in the reference backend's order of fp32 operations.
struct StepElement {
  float param, exp_avg, exp_avg_sq, max_exp_avg_sq, fisher;
  bool frozen;
};

FF_HD StepElement step_element(const StepScalars& s, const StepBlockConsts& c, float grad,
                               float param, float exp_avg, float exp_avg_sq,
                               float max_exp_avg_sq, float fisher, bool mask_on) {
  float g = grad;
  if (s.grad_scale != nullptr) g = math::div(g, c.grad_scale);
  if (s.maximize) g = -g;
  const float g2 = math::mul(g, g);

  StepElement out;
  out.fisher = fisher;
  if (s.has_fisher && s.fisher_mode != static_cast<int>(FisherMode::kNone)) {
    out.fisher = math::add(math::mul(c.fisher_a, fisher), math::mul(c.fisher_b, g2));
  }
  out.frozen = !mask_on || (s.has_freeze_above && out.fisher > s.k.freeze_above) ||
               (s.has_freeze_below && out.fisher < s.k.freeze_below);
  if (out.frozen) {
    out.param = param;
    out.exp_avg = exp_avg;
    out.exp_avg_sq = exp_avg_sq;
    out.max_exp_avg_sq = max_exp_avg_sq;
    return out;
  }
  float p = math::mul(param, c.decay);
  out.exp_avg = lerp(exp_avg, g, s.k.lerp_weight);
  // addcmul: v*beta2 + (1-beta2)*(g*g), each product rounded, then the sum.
  out.exp_avg_sq = math::add(math::mul(exp_avg_sq, s.k.beta2), math::mul(s.k.beta2_weight, g2));
  float second_moment = out.exp_avg_sq;
  out.max_exp_avg_sq = max_exp_avg_sq;
  if (s.amsgrad) {
    out.max_exp_avg_sq = math::max_nan(max_exp_avg_sq, out.exp_avg_sq);
    second_moment = out.max_exp_avg_sq;
  }
  const float denom = math::add(math::div(math::sqrt(second_moment), c.bias_correction2_sqrt), s.k.eps);
  float update = math::div(out.exp_avg, denom);
  if (s.apply_fisher_scale) {
    update = math::div(update, math::add(1.0f, math::mul(s.k.fisher_scale, out.fisher)));
  }
  out.param = math::sub(p, math::mul(c.step_size, update));
  return out;
}

// The chunk a block works on: its tensor's operands offset to the chunk, its scalars.
struct StepChunk {
  StepTensor t;  // pointers at the chunk's first element
  StepBlockConsts c;
  int slot;
  int n;          // elements in the chunk
  bool single;    // the tensor's only chunk: this block also advances its counts
};

template <typename P, typename S, typename F>
struct FusedStepThread {
  static constexpr int kPacket = packet_elems(
      static_cast<int>(sizeof(P) > sizeof(S) ? (sizeof(P) > sizeof(F) ? sizeof(P) : sizeof(F))
                                             : (sizeof(S) > sizeof(F) ? sizeof(S) : sizeof(F))));

  FF_HD static bool skipped(const StepScalars& s) {
    return s.found_inf != nullptr && *s.found_inf > 0.0f;  // a skipped step changes nothing
  }

  // Chunk `chunk` of the launch, its tensor searched from slot `lo` on. Every thread calls this
  // (it reads the tensor's step and Fisher counts) before the block's barrier.
  FF_HD static StepChunk chunk(const FusedStepArgs& a, int64_t chunk, int lo) {
    const StepTable& table = a.table;
    StepChunk w;
    w.slot = table.find(chunk, lo);
    const int64_t start = (chunk - table.first_chunk(w.slot)) * kChunkSize;
    const int64_t remaining = table.numel(w.slot) - start;
    w.n = static_cast<int>(remaining < kChunkSize ? remaining : kChunkSize);
    w.single = table.chunks(w.slot) == 1;
    StepTensor& t = w.t;
    t.param = static_cast<P*>(table.address(kStepParam, w.slot)) + start;
    t.grad = static_cast<const P*>(table.address(kStepGrad, w.slot)) + start;
    t.exp_avg = static_cast<S*>(table.address(kStepExpAvg, w.slot)) + start;
    t.exp_avg_sq = static_cast<S*>(table.address(kStepExpAvgSq, w.slot)) + start;
    t.max_exp_avg_sq = a.s.amsgrad
        ? static_cast<S*>(table.address(kStepMaxExpAvgSq, w.slot)) + start : nullptr;
    t.fisher = a.s.has_fisher ? static_cast<F*>(table.address(kStepFisher, w.slot)) + start
                              : nullptr;
    const bool* mask = static_cast<const bool*>(table.address(kStepMask, w.slot));
    t.mask = mask != nullptr ? mask + start : nullptr;
    t.step = static_cast<const float*>(table.address(kStepStep, w.slot));
    t.fisher_count = static_cast<const float*>(table.address(kStepFisherCount, w.slot));
    t.numel = w.n;
    t.first = start;
    w.c = step_block_consts(a.s, t);
    return w;
  }

  // Tile `base` of the chunk, element k of this thread at base + tile_element(thread, k); packet
  // loads and stores. Frozen lanes are stored with their original bits (unchanged); when none of
  // the thread's elements is active, p, m, v (and max v) are not stored at all.
  FF_HD static void tile(const StepScalars& s, const StepBlockConsts& c, const StepTensor& t,
                         int64_t base, int thread) {
    P* param = static_cast<P*>(t.param) + base;
    const Vec8<P> p = load_tile<kPacket>(param, thread);
    const Vec8<P> g = load_tile<kPacket>(static_cast<const P*>(t.grad) + base, thread);
    S* exp_avg = static_cast<S*>(t.exp_avg) + base;
    S* exp_avg_sq = static_cast<S*>(t.exp_avg_sq) + base;
    const Vec8<S> m = load_tile<kPacket>(exp_avg, thread);
    const Vec8<S> v = load_tile<kPacket>(exp_avg_sq, thread);
    S* max_exp_avg_sq = nullptr;
    Vec8<S> vmax{};
    if (s.amsgrad) {
      max_exp_avg_sq = static_cast<S*>(t.max_exp_avg_sq) + base;
      vmax = load_tile<kPacket>(max_exp_avg_sq, thread);
    }
    F* fisher = nullptr;
    Vec8<F> f{};
    if (s.has_fisher) {
      fisher = static_cast<F*>(t.fisher) + base;
      f = load_tile<kPacket>(fisher, thread);
    }
    Vec8<bool> mask{};
    if (t.mask != nullptr) mask = load_tile<kPacket>(t.mask + base, thread);

    Vec8<P> p_out = p;
    Vec8<S> m_out = m, v_out = v, vmax_out{};
    if (s.amsgrad) vmax_out = vmax;
    Vec8<F> f_out{};
    bool any_active = false;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const StepElement e = step_element(
          s, c, to_float(g.v[k]), to_float(p.v[k]), to_float(m.v[k]), to_float(v.v[k]),
          s.amsgrad ? to_float(vmax.v[k]) : 0.0f, s.has_fisher ? to_float(f.v[k]) : 0.0f,
          t.mask == nullptr || mask.v[k]);
      if (s.has_fisher) {
        f_out.v[k] = fisher_from_float(e.fisher, c.fisher_key,
                                       t.first + base + tile_element<kPacket>(thread, k), fisher);
      }
      if (!e.frozen) {
        any_active = true;
        p_out.v[k] = from_float<P>(e.param);
        m_out.v[k] = from_float<S>(e.exp_avg);
        v_out.v[k] = from_float<S>(e.exp_avg_sq);
        if (s.amsgrad) vmax_out.v[k] = from_float<S>(e.max_exp_avg_sq);
      }
    }
    if (s.has_fisher && s.fisher_mode != static_cast<int>(FisherMode::kNone)) {
      store_tile<kPacket>(fisher, thread, f_out);
    }
    if (any_active) {
      store_tile<kPacket>(param, thread, p_out);
      store_tile<kPacket>(exp_avg, thread, m_out);
      store_tile<kPacket>(exp_avg_sq, thread, v_out);
      if (s.amsgrad) store_tile<kPacket>(max_exp_avg_sq, thread, vmax_out);
    }
  }

  // Element i of the chunk, scalar loads and stores; a frozen element is not written.
  FF_HD static void scalar_element(const StepScalars& s, const StepBlockConsts& c,
                                   const StepTensor& t, int64_t i) {
    P* param = static_cast<P*>(t.param) + i;
    S* exp_avg = static_cast<S*>(t.exp_avg) + i;
    S* exp_avg_sq = static_cast<S*>(t.exp_avg_sq) + i;
    S* max_exp_avg_sq = s.amsgrad ? static_cast<S*>(t.max_exp_avg_sq) + i : nullptr;
    F* fisher = s.has_fisher ? static_cast<F*>(t.fisher) + i : nullptr;
    const StepElement e = step_element(
        s, c, to_float(static_cast<const P*>(t.grad)[i]), to_float(*param), to_float(*exp_avg),
        to_float(*exp_avg_sq), s.amsgrad ? to_float(*max_exp_avg_sq) : 0.0f,
        s.has_fisher ? to_float(*fisher) : 0.0f, t.mask == nullptr || t.mask[i]);
    if (s.has_fisher && s.fisher_mode != static_cast<int>(FisherMode::kNone)) {
      *fisher = fisher_from_float(e.fisher, c.fisher_key, t.first + i, fisher);
    }
    if (!e.frozen) {
      *param = from_float<P>(e.param);
      *exp_avg = from_float<S>(e.exp_avg);
      *exp_avg_sq = from_float<S>(e.exp_avg_sq);
      if (s.amsgrad) *max_exp_avg_sq = from_float<S>(e.max_exp_avg_sq);
    }
  }

  // This thread's share of the chunk: whole tiles with packet accesses when every operand of the
  // chunk is aligned to its packet, the rest (a tail under one tile, or everything of a
  // misaligned tensor) element by element, consecutive threads on consecutive elements.
  FF_HD static void work(const StepScalars& s, const StepChunk& w, int thread) {
    const StepTensor& t = w.t;
    const bool packets =
        aligned_to(t.param, sizeof(P) * kPacket) && aligned_to(t.grad, sizeof(P) * kPacket) &&
        aligned_to(t.exp_avg, sizeof(S) * kPacket) &&
        aligned_to(t.exp_avg_sq, sizeof(S) * kPacket) &&
        (!s.amsgrad || aligned_to(t.max_exp_avg_sq, sizeof(S) * kPacket)) &&
        (!s.has_fisher || aligned_to(t.fisher, sizeof(F) * kPacket)) &&
        (t.mask == nullptr || aligned_to(t.mask, kPacket));
    int64_t first_scalar = 0;
    if (packets) {
      const int64_t tiles = w.n / kTile;
      for (int64_t tile_index = 0; tile_index < tiles; ++tile_index) {
        tile(s, w.c, t, tile_index * kTile, thread);
      }
      first_scalar = tiles * kTile;
    }
    for (int64_t i = first_scalar + thread; i < w.n; i += kBlockSize) {
      scalar_element(s, w.c, t, i);
    }
  }

  // After the block's barrier: one thread advances the counts of a single-chunk tensor (every
  // thread of the block has read them; no other block reads them in this launch).
  FF_HD static void advance_counts(const FusedStepArgs& a, const StepChunk& w) {
    float* step = static_cast<float*>(a.table.address(kStepStep, w.slot));
    *step = math::add(*step, 1.0f);
    float* count = static_cast<float*>(a.table.address(kStepFisherCount, w.slot));
    if (count != nullptr) *count = math::add(*count, 1.0f);
  }
};

// Block b takes chunks b, b + gridDim.x, ... of the launch (the grid is what the GPU holds at
// once, so one launch covers any number of chunks).
template <typename P, typename S, typename F>
__global__ void __launch_bounds__(kBlockSize, kStepMinBlocksPerSm)
    fused_step_kernel(const __grid_constant__ FusedStepArgs args) {
  using Thread = FusedStepThread<P, S, F>;
  if (Thread::skipped(args.s)) return;
  int slot = 0;
  for (int64_t chunk = blockIdx.x; chunk < args.table.num_chunks; chunk += gridDim.x) {
    const StepChunk w = Thread::chunk(args, chunk, slot);
    slot = w.slot;
    Thread::work(args.s, w, static_cast<int>(threadIdx.x));
    if (w.single) {  // (uniform across the block)
      __syncthreads();
      if (threadIdx.x == 0) Thread::advance_counts(args, w);
    }
  }
}

// The same blocks and chunks on the host, one simulated thread at a time, in the kernel's order
// of phases: every thread's work on a chunk, then the count update after the barrier.
template <typename P, typename S, typename F>
void emulate_fused_step(const FusedStepArgs& args, int grid) {
  using Thread = FusedStepThread<P, S, F>;
  if (Thread::skipped(args.s)) return;
  for (int block = 0; block < grid; ++block) {
    int slot = 0;
    for (int64_t chunk = block; chunk < args.table.num_chunks; chunk += grid) {
      StepChunk w{};
      for (int thread = 0; thread < kBlockSize; ++thread) {
        w = Thread::chunk(args, chunk, slot);
        Thread::work(args.s, w, thread);
      }
      slot = w.slot;
      if (w.single) Thread::advance_counts(args, w);
    }
  }
}

StepScalars make_step_scalars(const FusedStepProblem& problem);
// Advances the step counts (and the Fisher counts when the Fisher accumulates) unless found_inf,
// of the tensors the step kernel does not: empty ones and those of more than one chunk. Runs
// after the step kernel, which read the old counts.
void advance_other_counts(const FusedStepProblem& problem, const ExecTarget& target);

// Address columns of a problem's step tables.
inline void step_fields_present(const FusedStepProblem& p, bool (&present)[kStepFields]) {
  bool any_mask = false;
  for (int64_t i = 0; p.masks != nullptr && i < p.num_tensors && !any_mask; ++i) {
    any_mask = p.masks[i] != nullptr;
  }
  for (bool& field : present) field = false;
  present[kStepParam] = present[kStepGrad] = present[kStepExpAvg] = present[kStepExpAvgSq] = true;
  present[kStepMaxExpAvgSq] = p.settings.amsgrad;
  present[kStepFisher] = p.fishers != nullptr;
  present[kStepMask] = any_mask;
  present[kStepStep] = true;
  present[kStepFisherCount] = p.fishers != nullptr && p.settings.fisher_mode != FisherMode::kNone;
}

template <typename P, typename S, typename F>
void run_fused_step(const FusedStepProblem& problem, const ExecTarget& target) {
  check_table_numels("fused_step", problem.num_tensors, problem.numels);
  FusedStepArgs args;  // up to 32 KB, copied into the kernel argument at each launch
  args.s = make_step_scalars(problem);
  bool present[kStepFields];
  step_fields_present(problem, present);
  static std::atomic<int> resident[kMaxCachedDevices];
  const int max_grid = target.emulate_on_host
      ? kEmulatedResidentBlocks : resident_blocks(fused_step_kernel<P, S, F>, resident);
  const auto get = [&](int64_t i, const void* (&a)[kStepFields]) {
    a[kStepParam] = problem.params[i];
    a[kStepGrad] = problem.grads[i];
    a[kStepExpAvg] = problem.exp_avgs[i];
    a[kStepExpAvgSq] = problem.exp_avg_sqs[i];
    a[kStepMaxExpAvgSq] = problem.settings.amsgrad ? problem.max_exp_avg_sqs[i] : nullptr;
    a[kStepFisher] = problem.fishers != nullptr ? problem.fishers[i] : nullptr;
    a[kStepMask] = problem.masks != nullptr ? problem.masks[i] : nullptr;
    a[kStepStep] = problem.steps[i];
    a[kStepFisherCount] = present[kStepFisherCount] ? problem.fisher_counts[i] : nullptr;
  };
  plan_table_launches(args.table, present, problem.num_tensors, problem.numels, get,
                      [&](const StepTable& table) {
    const int grid = grid_blocks(table.num_chunks, max_grid);
    if (!target.launch) {
      return;
    } else if (target.emulate_on_host) {
      emulate_fused_step<P, S, F>(args, grid);
    } else {
      fused_step_kernel<P, S, F><<<grid, kBlockSize, 0, as_stream(target)>>>(args);
      check_launch("fused_step");
    }
  });
  advance_other_counts(problem, target);
}

// Entry points of the per-param-dtype translation units.
void fused_step_f32(const FusedStepProblem& problem, const ExecTarget& target);
void fused_step_bf16(const FusedStepProblem& problem, const ExecTarget& target);
void fused_step_f16(const FusedStepProblem& problem, const ExecTarget& target);

// Calls run_fused_step<P, S, F> for the problem's state and Fisher dtypes.
template <typename P>
void dispatch_state_and_fisher(const FusedStepProblem& problem, const ExecTarget& target) {
  const bool state_bf16 = problem.state_dtype == DType::kBFloat16;
  // Without a Fisher, F only sets the packet width: the state's type keeps it at 16 bytes.
  const bool fisher_bf16 = problem.fishers != nullptr ? problem.fisher_dtype == DType::kBFloat16
                                                      : state_bf16;
  if (problem.state_dtype != DType::kFloat32 && !state_bf16) {
    throw std::invalid_argument(std::string("fused_step: unsupported state dtype ") +
                                dtype_name(problem.state_dtype));
  }
  if (problem.fishers != nullptr && problem.fisher_dtype != DType::kFloat32 && !fisher_bf16) {
    throw std::invalid_argument(std::string("fused_step: unsupported fisher dtype ") +
                                dtype_name(problem.fisher_dtype));
  }
  if (state_bf16) {
    if (fisher_bf16) {
      run_fused_step<P, __nv_bfloat16, __nv_bfloat16>(problem, target);
    } else {
      run_fused_step<P, __nv_bfloat16, float>(problem, target);
    }
  } else {
    if (fisher_bf16) {
      run_fused_step<P, float, __nv_bfloat16>(problem, target);
    } else {
      run_fused_step<P, float, float>(problem, target);
    }
  }
}

}  // namespace fisherforget
