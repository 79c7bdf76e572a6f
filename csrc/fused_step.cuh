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

using StepTable = TensorTable<kStepFields, kParamBytes>;

struct FusedStepArgs {
  StepCall call;  // step_call(settings): the per-call constants, shared with the CPU kernels
  StepTable table;
};
static_assert(sizeof(StepCall) <= kScalarsReserve, "StepCall outgrew its reserve");
static_assert(sizeof(FusedStepArgs) <= kParamBytes, "fused_step kernel argument too large");

// Blocks per SM the step kernel is compiled for: 2 x 256 threads leaves up to 128 registers per
// thread (the kernel branches at run time on amsgrad, the Fisher, masks and freezing), and
// 512 threads x 10 packets of 16 bytes in flight per SM is several times what the memory
// latency needs. To be tuned on a GPU (docs/cuda.md).
constexpr int kStepMinBlocksPerSm = 2;

// The constants of one block's tensor (tensor_consts, ff_kernels.h, as on the CPU), from the
// counts and the call's lr tensor and grad_scale in device memory.
FF_HD TensorConsts step_block_consts(const StepCall& call, const StepTensor& t) {
  const StepSettings& s = call.settings;
  double lr_value = 0.0;  // the lr tensor's value, when there is one
  switch (s.lr_kind) {
    case LrKind::kFloat32:
      lr_value = *static_cast<const float*>(s.lr_tensor);
      break;
    case LrKind::kFloat64:
      lr_value = *static_cast<const double*>(s.lr_tensor);
      break;
    case LrKind::kBFloat16:
      lr_value = to_float(*static_cast<const __nv_bfloat16*>(s.lr_tensor));
      break;
    case LrKind::kFloat16:
      lr_value = to_float(*static_cast<const __half*>(s.lr_tensor));
      break;
    case LrKind::kHost:
      break;
  }
  // The step count is incremented after the kernel (by increment_counts).
  return tensor_consts(call, lr_decay(call, lr_value), bias_corrections(call, *t.step),
                       t.fisher_count, s.grad_scale != nullptr ? *s.grad_scale : 1.0f);
}

// The chunk a block works on: its tensor's operands offset to the chunk, its scalars.
struct StepChunk {
  StepTensor t;  // pointers at the chunk's first element
  TensorConsts c;
  int slot;
  int n;          // elements in the chunk
  bool single;    // the tensor's only chunk: this block also advances its counts
};

template <typename P, typename S, typename F>
struct FusedStepThread {
  static constexpr int kPacket = packet_elems(
      static_cast<int>(sizeof(P) > sizeof(S) ? (sizeof(P) > sizeof(F) ? sizeof(P) : sizeof(F))
                                             : (sizeof(S) > sizeof(F) ? sizeof(S) : sizeof(F))));

  FF_HD static bool skipped(const StepCall& call) {  // a skipped step changes nothing
    return call.settings.found_inf != nullptr && *call.settings.found_inf > 0.0f;
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
    t.max_exp_avg_sq = a.call.flags.amsgrad
        ? static_cast<S*>(table.address(kStepMaxExpAvgSq, w.slot)) + start : nullptr;
    t.fisher = math::reads_fisher(a.call.flags)
        ? static_cast<F*>(table.address(kStepFisher, w.slot)) + start : nullptr;
    const bool* mask = static_cast<const bool*>(table.address(kStepMask, w.slot));
    t.mask = mask != nullptr ? mask + start : nullptr;
    t.step = static_cast<const float*>(table.address(kStepStep, w.slot));
    t.fisher_count = static_cast<const float*>(table.address(kStepFisherCount, w.slot));
    t.numel = w.n;
    t.first = start;
    w.c = step_block_consts(a.call, t);
    return w;
  }

  // One element through math::step_lane (rounded as torch's CUDA kernels round the moments);
  // returns whether it is frozen. p, m, v, vmax, fisher: the old values in, the new ones out.
  FF_HD static bool step_element(const StepCall& call, const TensorConsts& c, bool may_freeze,
                                 bool may_update, float grad, float& p, float& m, float& v,
                                 float& vmax, float& fisher) {
    return math::step_lane<math::MomentRounding::kSeparate>(
        call.flags, call.k, c.lane, may_freeze, may_update, grad, p, m, v, vmax, fisher);
  }

  // Tile `base` of the chunk, element k of this thread at base + tile_element(thread, k); packet
  // loads and stores. Frozen lanes are stored with their original bits (unchanged); when none of
  // the thread's elements is active, p, m, v (and max v) are not stored at all.
  FF_HD static void tile(const StepCall& call, const TensorConsts& c, const StepTensor& t,
                         int64_t base, int thread) {
    const math::StepFlags& f = call.flags;
    P* param = static_cast<P*>(t.param) + base;
    const Vec8<P> p = load_tile<kPacket>(param, thread);
    const Vec8<P> g = load_tile<kPacket>(static_cast<const P*>(t.grad) + base, thread);
    S* exp_avg = static_cast<S*>(t.exp_avg) + base;
    S* exp_avg_sq = static_cast<S*>(t.exp_avg_sq) + base;
    const Vec8<S> m = load_tile<kPacket>(exp_avg, thread);
    const Vec8<S> v = load_tile<kPacket>(exp_avg_sq, thread);
    S* max_exp_avg_sq = nullptr;
    Vec8<S> vmax{};
    if (f.amsgrad) {
      max_exp_avg_sq = static_cast<S*>(t.max_exp_avg_sq) + base;
      vmax = load_tile<kPacket>(max_exp_avg_sq, thread);
    }
    F* fisher = nullptr;
    Vec8<F> fi{};
    if (t.fisher != nullptr) {
      fisher = static_cast<F*>(t.fisher) + base;
      fi = load_tile<kPacket>(fisher, thread);
    }
    Vec8<bool> mask{};
    if (t.mask != nullptr) mask = load_tile<kPacket>(t.mask + base, thread);
    const bool may_freeze = math::may_freeze(f, t.mask != nullptr);

    Vec8<P> p_out = p;
    Vec8<S> m_out = m, v_out = v, vmax_out{};
    if (f.amsgrad) vmax_out = vmax;
    Vec8<F> f_out{};
    bool any_active = false;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      float pk = to_float(p.v[k]), mk = to_float(m.v[k]), vk = to_float(v.v[k]);
      float vmaxk = f.amsgrad ? to_float(vmax.v[k]) : 0.0f;
      float fk = fisher != nullptr ? to_float(fi.v[k]) : 0.0f;
      const bool frozen = step_element(call, c, may_freeze, t.mask == nullptr || mask.v[k],
                                        to_float(g.v[k]), pk, mk, vk, vmaxk, fk);
      if (f.accumulate) {
        f_out.v[k] = fisher_from_float(fk, c.fisher_key,
                                       t.first + base + tile_element<kPacket>(thread, k), fisher);
      }
      if (!frozen) {
        any_active = true;
        p_out.v[k] = from_float<P>(pk);
        m_out.v[k] = from_float<S>(mk);
        v_out.v[k] = from_float<S>(vk);
        if (f.amsgrad) vmax_out.v[k] = from_float<S>(vmaxk);
      }
    }
    if (f.accumulate) store_tile<kPacket>(fisher, thread, f_out);
    if (any_active) {
      store_tile<kPacket>(param, thread, p_out);
      store_tile<kPacket>(exp_avg, thread, m_out);
      store_tile<kPacket>(exp_avg_sq, thread, v_out);
      if (f.amsgrad) store_tile<kPacket>(max_exp_avg_sq, thread, vmax_out);
    }
  }

  // Element i of the chunk, scalar loads and stores; a frozen element is not written.
  FF_HD static void scalar_element(const StepCall& call, const TensorConsts& c,
                                   const StepTensor& t, int64_t i) {
    const math::StepFlags& f = call.flags;
    P* param = static_cast<P*>(t.param) + i;
    S* exp_avg = static_cast<S*>(t.exp_avg) + i;
    S* exp_avg_sq = static_cast<S*>(t.exp_avg_sq) + i;
    S* max_exp_avg_sq = f.amsgrad ? static_cast<S*>(t.max_exp_avg_sq) + i : nullptr;
    F* fisher = t.fisher != nullptr ? static_cast<F*>(t.fisher) + i : nullptr;
    float p = to_float(*param), m = to_float(*exp_avg), v = to_float(*exp_avg_sq);
    float vmax = f.amsgrad ? to_float(*max_exp_avg_sq) : 0.0f;
    float fi = fisher != nullptr ? to_float(*fisher) : 0.0f;
    const bool frozen = step_element(call, c, math::may_freeze(f, t.mask != nullptr),
                                     t.mask == nullptr || t.mask[i],
                                     to_float(static_cast<const P*>(t.grad)[i]), p, m, v, vmax, fi);
    if (f.accumulate) *fisher = fisher_from_float(fi, c.fisher_key, t.first + i, fisher);
    if (!frozen) {
      *param = from_float<P>(p);
      *exp_avg = from_float<S>(m);
      *exp_avg_sq = from_float<S>(v);
      if (f.amsgrad) *max_exp_avg_sq = from_float<S>(vmax);
    }
  }

  // This thread's share of the chunk: whole tiles with packet accesses when every operand of the
  // chunk is aligned to its packet, the rest (a tail under one tile, or everything of a
  // misaligned tensor) element by element, consecutive threads on consecutive elements.
  FF_HD static void work(const StepCall& call, const StepChunk& w, int thread) {
    const StepTensor& t = w.t;
    const bool packets =
        aligned_to(t.param, sizeof(P) * kPacket) && aligned_to(t.grad, sizeof(P) * kPacket) &&
        aligned_to(t.exp_avg, sizeof(S) * kPacket) &&
        aligned_to(t.exp_avg_sq, sizeof(S) * kPacket) &&
        (!call.flags.amsgrad || aligned_to(t.max_exp_avg_sq, sizeof(S) * kPacket)) &&
        (t.fisher == nullptr || aligned_to(t.fisher, sizeof(F) * kPacket)) &&
        (t.mask == nullptr || aligned_to(t.mask, kPacket));
    int64_t first_scalar = 0;
    if (packets) {
      const int64_t tiles = w.n / kTile;
      for (int64_t tile_index = 0; tile_index < tiles; ++tile_index) {
        tile(call, w.c, t, tile_index * kTile, thread);
      }
      first_scalar = tiles * kTile;
    }
    for (int64_t i = first_scalar + thread; i < w.n; i += kBlockSize) {
      scalar_element(call, w.c, t, i);
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
  if (Thread::skipped(args.call)) return;
  int slot = 0;
  for (int64_t chunk = blockIdx.x; chunk < args.table.num_chunks; chunk += gridDim.x) {
    const StepChunk w = Thread::chunk(args, chunk, slot);
    slot = w.slot;
    Thread::work(args.call, w, static_cast<int>(threadIdx.x));
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
  if (Thread::skipped(args.call)) return;
  for (int block = 0; block < grid; ++block) {
    int slot = 0;
    for (int64_t chunk = block; chunk < args.table.num_chunks; chunk += grid) {
      StepChunk w{};
      for (int thread = 0; thread < kBlockSize; ++thread) {
        w = Thread::chunk(args, chunk, slot);
        Thread::work(args.call, w, thread);
      }
      slot = w.slot;
      if (w.single) Thread::advance_counts(args, w);
    }
  }
}

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
  args.call = step_call(problem.settings);
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
