// The fused Fisher-AdamW step: kernel template, launcher and host emulation.
// Instantiated per param dtype in fused_step_{f32,bf16,f16}.cu (bounds compile time per file).
#pragma once

#include "ff_common.cuh"
#include "ff_tensor_table.h"

namespace fisherforget {

// Per-tensor table entry: 80 bytes.
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
  float decay_host;        // (float)(1 - lr * weight_decay) for a host lr
  float weight_decay_f;    // (float)weight_decay, for fp32/bf16/fp16 lr tensors
  float beta1_weight;      // (float)(1 - beta1): the lerp weight
  float beta2_f;           // (float)beta2
  float beta2_weight;      // (float)(1 - beta2)
  float eps;
  float fisher_a, fisher_b;  // ema / sum weights (mean: per tensor from its count)
  float fisher_scale;
  float freeze_above, freeze_below;
  int lr_kind;
  int fisher_mode;
  bool has_fisher, apply_fisher_scale, amsgrad, maximize, has_freeze_above, has_freeze_below;
};

constexpr int kStepMaxTensors = 24;
constexpr int kStepMaxBlocks = 320;

struct FusedStepArgs {
  StepScalars s;
  StepTensor tensors[kStepMaxTensors];
  int32_t block_chunk[kStepMaxBlocks];
  uint8_t block_slot[kStepMaxBlocks];
};
// CUDA kernel arguments are limited to 4096 bytes (without the CUDA 12.1 large-argument mode).
static_assert(sizeof(FusedStepArgs) <= 4000, "fused_step kernel argument exceeds 4 KB");

// Scalars shared by every element of one block (one tensor, one chunk).
struct StepBlockConsts {
  float decay;      // 1 - lr * weight_decay in fp32 (fp64 for a float64 lr tensor)
  float step_size;  // (float)(lr / (1 - beta1^t))
  float bias_correction2_sqrt;  // (float)sqrt(1 - beta2^t)
  float fisher_a, fisher_b;
  float grad_scale;  // *StepScalars::grad_scale, loaded once per thread (1 when absent)
};

FF_HD StepBlockConsts step_block_consts(const StepScalars& s, const StepTensor& t) {
  StepBlockConsts c;
  // The step count is incremented after the kernel (by increment_counts): t = step + 1 here.
  const double step = static_cast<double>(add_rn(*t.step, 1.0f));
  const double bias_correction1 = 1.0 - ::pow(s.beta1, step);
  const double bias_correction2_sqrt = ::sqrt(1.0 - ::pow(s.beta2, step));
  double lr = s.lr;
  switch (s.lr_kind) {
    case static_cast<int>(LrKind::kFloat32): {
      const float value = *static_cast<const float*>(s.lr_tensor);
      lr = value;
      c.decay = sub_rn(1.0f, mul_rn(value, s.weight_decay_f));
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
      c.decay = sub_rn(1.0f, mul_rn(value, s.weight_decay_f));  // widened: fp32 math
      break;
    }
    case static_cast<int>(LrKind::kFloat16): {
      const float value = to_float(*static_cast<const __half*>(s.lr_tensor));
      lr = value;
      c.decay = sub_rn(1.0f, mul_rn(value, s.weight_decay_f));  // widened: fp32 math
      break;
    }
    default:
      c.decay = s.decay_host;
  }
  c.step_size = static_cast<float>(lr / bias_correction1);
  c.bias_correction2_sqrt = static_cast<float>(bias_correction2_sqrt);
  c.fisher_a = s.fisher_a;
  c.fisher_b = s.fisher_b;
  c.grad_scale = s.grad_scale != nullptr ? *s.grad_scale : 1.0f;
  if (s.fisher_mode == static_cast<int>(FisherMode::kMean)) {
    // n = count + 1 accumulations including this one: F = (n-1)/n * F + 1/n * g^2.
    const float n = add_rn(*t.fisher_count, 1.0f);
    c.fisher_a = div_rn(sub_rn(n, 1.0f), n);
    c.fisher_b = div_rn(1.0f, n);
  }
  return c;
}

// One element: DESIGN section 2, in the reference backend's order of fp32 operations.
struct StepElement {
  float param, exp_avg, exp_avg_sq, max_exp_avg_sq, fisher;
  bool frozen;
};

FF_HD StepElement step_element(const StepScalars& s, const StepBlockConsts& c, float grad,
                               float param, float exp_avg, float exp_avg_sq,
                               float max_exp_avg_sq, float fisher, bool mask_on) {
  float g = grad;
  if (s.grad_scale != nullptr) g = div_rn(g, c.grad_scale);
  if (s.maximize) g = -g;
  const float g2 = mul_rn(g, g);

  StepElement out;
  out.fisher = fisher;
  if (s.has_fisher && s.fisher_mode != static_cast<int>(FisherMode::kNone)) {
    out.fisher = add_rn(mul_rn(c.fisher_a, fisher), mul_rn(c.fisher_b, g2));
  }
  out.frozen = !mask_on || (s.has_freeze_above && out.fisher > s.freeze_above) ||
               (s.has_freeze_below && out.fisher < s.freeze_below);
  if (out.frozen) {
    out.param = param;
    out.exp_avg = exp_avg;
    out.exp_avg_sq = exp_avg_sq;
    out.max_exp_avg_sq = max_exp_avg_sq;
    return out;
  }
  float p = mul_rn(param, c.decay);
  out.exp_avg = lerp(exp_avg, g, s.beta1_weight);
  // addcmul: v*beta2 + (1-beta2)*(g*g), written as ATen's addcmul kernel writes it.
  out.exp_avg_sq = mul_rn(exp_avg_sq, s.beta2_f) + s.beta2_weight * g2;
  float second_moment = out.exp_avg_sq;
  out.max_exp_avg_sq = max_exp_avg_sq;
  if (s.amsgrad) {
    out.max_exp_avg_sq = max_propagate_nan(max_exp_avg_sq, out.exp_avg_sq);
    second_moment = out.max_exp_avg_sq;
  }
  const float denom = add_rn(div_rn(sqrtf(second_moment), c.bias_correction2_sqrt), s.eps);
  float update = div_rn(out.exp_avg, denom);
  if (s.apply_fisher_scale) {
    update = div_rn(update, add_rn(1.0f, mul_rn(s.fisher_scale, out.fisher)));
  }
  out.param = sub_rn(p, mul_rn(c.step_size, update));
  return out;
}

template <typename P, typename S, typename F>
struct FusedStepThread {
  // Elements [i, i + kVec) of the chunk, 16-byte loads and stores. Frozen lanes are stored with
  // their original bits (unchanged); a packet with no active lane is not stored at all.
  FF_HD static void vector_group(const StepScalars& s, const StepBlockConsts& c,
                                 const StepTensor& t, int64_t i) {
    P* param = static_cast<P*>(t.param) + i;
    const Vec8<P> p = load_vec(param);
    const Vec8<P> g = load_vec(static_cast<const P*>(t.grad) + i);
    S* exp_avg = static_cast<S*>(t.exp_avg) + i;
    S* exp_avg_sq = static_cast<S*>(t.exp_avg_sq) + i;
    const Vec8<S> m = load_vec(exp_avg);
    const Vec8<S> v = load_vec(exp_avg_sq);
    S* max_exp_avg_sq = nullptr;
    Vec8<S> vmax{};
    if (s.amsgrad) {
      max_exp_avg_sq = static_cast<S*>(t.max_exp_avg_sq) + i;
      vmax = load_vec(max_exp_avg_sq);
    }
    F* fisher = nullptr;
    Vec8<F> f{};
    if (s.has_fisher) {
      fisher = static_cast<F*>(t.fisher) + i;
      f = load_vec(fisher);
    }
    MaskVec8 mask{};
    if (t.mask != nullptr) mask = load_mask_vec(t.mask + i);

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
      if (s.has_fisher) f_out.v[k] = from_float<F>(e.fisher);
      if (!e.frozen) {
        any_active = true;
        p_out.v[k] = from_float<P>(e.param);
        m_out.v[k] = from_float<S>(e.exp_avg);
        v_out.v[k] = from_float<S>(e.exp_avg_sq);
        if (s.amsgrad) vmax_out.v[k] = from_float<S>(e.max_exp_avg_sq);
      }
    }
    if (s.has_fisher && s.fisher_mode != static_cast<int>(FisherMode::kNone)) {
      store_vec(fisher, f_out);
    }
    if (any_active) {
      store_vec(param, p_out);
      store_vec(exp_avg, m_out);
      store_vec(exp_avg_sq, v_out);
      if (s.amsgrad) store_vec(max_exp_avg_sq, vmax_out);
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
      *fisher = from_float<F>(e.fisher);
    }
    if (!e.frozen) {
      *param = from_float<P>(e.param);
      *exp_avg = from_float<S>(e.exp_avg);
      *exp_avg_sq = from_float<S>(e.exp_avg_sq);
      if (s.amsgrad) *max_exp_avg_sq = from_float<S>(e.max_exp_avg_sq);
    }
  }

  FF_HD static void run(const FusedStepArgs& a, int block, int thread, int num_threads) {
    const StepScalars& s = a.s;
    if (s.found_inf != nullptr && *s.found_inf > 0.0f) return;  // skipped step: nothing changes
    const StepTensor& t = a.tensors[a.block_slot[block]];
    const int64_t start = static_cast<int64_t>(a.block_chunk[block]) * kChunkSize;
    const int64_t remaining = t.numel - start;
    const int n = static_cast<int>(remaining < kChunkSize ? remaining : kChunkSize);
    const StepBlockConsts c = step_block_consts(s, t);

    StepTensor chunk = t;
    chunk.param = static_cast<P*>(t.param) + start;
    chunk.grad = static_cast<const P*>(t.grad) + start;
    chunk.exp_avg = static_cast<S*>(t.exp_avg) + start;
    chunk.exp_avg_sq = static_cast<S*>(t.exp_avg_sq) + start;
    if (s.amsgrad) chunk.max_exp_avg_sq = static_cast<S*>(t.max_exp_avg_sq) + start;
    if (s.has_fisher) chunk.fisher = static_cast<F*>(t.fisher) + start;
    if (t.mask != nullptr) chunk.mask = t.mask + start;

    bool vectorized = aligned_to(chunk.param, 16) && aligned_to(chunk.grad, 16) &&
                      aligned_to(chunk.exp_avg, 16) && aligned_to(chunk.exp_avg_sq, 16) &&
                      (!s.amsgrad || aligned_to(chunk.max_exp_avg_sq, 16)) &&
                      (!s.has_fisher || aligned_to(chunk.fisher, 16)) &&
                      (chunk.mask == nullptr || aligned_to(chunk.mask, 8));
    int first_scalar = 0;
    if (vectorized) {
      const int groups = n / kVec;
      for (int group = thread; group < groups; group += num_threads) {
        vector_group(s, c, chunk, static_cast<int64_t>(group) * kVec);
      }
      first_scalar = groups * kVec;
    }
    for (int i = first_scalar + thread; i < n; i += num_threads) scalar_element(s, c, chunk, i);
  }
};

template <typename P, typename S, typename F>
__global__ void __launch_bounds__(kBlockSize)
    fused_step_kernel(const __grid_constant__ FusedStepArgs args) {
  FusedStepThread<P, S, F>::run(args, blockIdx.x, threadIdx.x, blockDim.x);
}

StepScalars make_step_scalars(const FusedStepProblem& problem);
// Increments the step counts (and the Fisher counts when the Fisher accumulates) unless found_inf;
// runs after every chunk of the step has read the old counts.
void increment_counts(const FusedStepProblem& problem, const ExecTarget& target);

template <typename P, typename S, typename F>
void run_fused_step(const FusedStepProblem& problem, const ExecTarget& target) {
  FusedStepArgs args;
  args.s = make_step_scalars(problem);
  plan_launches<kStepMaxTensors, kStepMaxBlocks>(
      problem.num_tensors, problem.numels, kChunkSize, [&](const auto& plan) {
        for (int slot = 0; slot < plan.num_slots; ++slot) {
          const int64_t i = plan.slot_tensor[slot];
          StepTensor& t = args.tensors[slot];
          t.param = problem.params[i];
          t.grad = problem.grads[i];
          t.exp_avg = problem.exp_avgs[i];
          t.exp_avg_sq = problem.exp_avg_sqs[i];
          t.max_exp_avg_sq = problem.amsgrad ? problem.max_exp_avg_sqs[i] : nullptr;
          t.fisher = problem.fishers != nullptr ? problem.fishers[i] : nullptr;
          t.mask = problem.masks != nullptr ? problem.masks[i] : nullptr;
          t.step = problem.steps[i];
          t.fisher_count = problem.fisher_counts != nullptr ? problem.fisher_counts[i] : nullptr;
          t.numel = problem.numels[i];
        }
        for (int b = 0; b < plan.num_blocks; ++b) {
          args.block_slot[b] = plan.block_slot[b];
          args.block_chunk[b] = plan.block_chunk[b];
        }
        if (target.emulate_on_host) {
          for (int b = 0; b < plan.num_blocks; ++b) {
            for (int thread = 0; thread < kBlockSize; ++thread) {
              FusedStepThread<P, S, F>::run(args, b, thread, kBlockSize);
            }
          }
        } else {
          fused_step_kernel<P, S, F>
              <<<plan.num_blocks, kBlockSize, 0, as_stream(target)>>>(args);
          check_launch("fused_step");
        }
      });
  increment_counts(problem, target);
}

// Entry points of the per-param-dtype translation units.
void fused_step_f32(const FusedStepProblem& problem, const ExecTarget& target);
void fused_step_bf16(const FusedStepProblem& problem, const ExecTarget& target);
void fused_step_f16(const FusedStepProblem& problem, const ExecTarget& target);

// Calls run_fused_step<P, S, F> for the problem's state and Fisher dtypes.
template <typename P>
void dispatch_state_and_fisher(const FusedStepProblem& problem, const ExecTarget& target) {
  const bool state_bf16 = problem.state_dtype == DType::kBFloat16;
  const bool fisher_bf16 = problem.fishers != nullptr && problem.fisher_dtype == DType::kBFloat16;
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
