// The torch-free interface of the fisherforget kernels: the step's hyperparameters
// (StepSettings) and the constants every kernel derives from them (step_call, tensor_consts),
// shared by the CPU kernels (csrc/cpu/) and the CUDA kernels (csrc/*.cu), and the CUDA launchers.
//
// Callers of the CUDA launchers pass plain host arrays of device pointers and element counts; the
// kernels put many tensors into each launch's address table (ff_tensor_table.h) and launch on the
// given stream. The binding (binding_checks.h) is the only code that knows about torch; it
// validates the tensors and fills these structs. Every launcher throws std::runtime_error when a
// launch fails.
//
// Math: docs/design.md and fisherforget/backends/reference.py, which these kernels follow op
// for op (fp32 arithmetic, bias corrections in double from the per-tensor step count).
#pragma once

#include <cmath>
#include <cstdint>

#include "ff_math.h"

namespace fisherforget {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

const char* dtype_name(DType dtype);

enum class FisherMode : int { kNone = 0, kEma = 1, kMean = 2, kSum = 3 };

// How the learning rate arrives: a host double (a Python float) or a 0-dim device tensor whose
// dtype fixes the precision of `1 - lr * weight_decay`, as it does in the reference backend.
enum class LrKind : int { kHost = 0, kFloat32 = 1, kFloat64 = 2, kBFloat16 = 3, kFloat16 = 4 };

// The scalars of one fused step (the op schema's keyword arguments), as the binding read them: the
// one hyperparameter struct from the binding to the CPU and CUDA kernels.
struct StepSettings {
  double lr = 0.0;                  // used when lr_kind == kHost
  const void* lr_tensor = nullptr;  // a 0-dim tensor of lr_kind (on the params' device) otherwise
  LrKind lr_kind = LrKind::kHost;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  bool amsgrad = false, maximize = false;
  bool has_fisher = false;  // every entry has a fisher
  FisherMode fisher_mode = FisherMode::kNone;
  double fisher_beta = 0.0, fisher_scale = 0.0;
  bool has_freeze_above = false, has_freeze_below = false;
  double freeze_above = 0.0, freeze_below = 0.0;
  const float* grad_scale = nullptr;  // 0-dim fp32 or null
  const float* found_inf = nullptr;   // 0-dim fp32 or null
};

// A step's per-call constants, rounded once as the reference rounds them (a Python float that
// meets an fp32 tensor is rounded to fp32 first): step_call(settings), the one place they are
// computed, for the CPU and the CUDA kernels alike.
struct StepCall {
  StepSettings settings;
  math::StepFlags flags;
  math::StepCallConsts<float> k;
  float fisher_a, fisher_b;  // F = a*F + b*g^2: ema beta, 1 - beta; sum 1, 1 (mean: per tensor)
  float decay_host;          // (float)(1 - lr*weight_decay), in double, for a host lr
  float weight_decay;        // (float)weight_decay: 1 - lr*wd in fp32 for an fp32/16-bit lr
};

inline StepCall step_call(const StepSettings& s) {
  StepCall c;
  c.settings = s;
  c.flags.scaled_grad = s.grad_scale != nullptr;
  c.flags.maximize = s.maximize;
  c.flags.accumulate = s.has_fisher && s.fisher_mode != FisherMode::kNone;
  c.flags.freeze_above = s.has_freeze_above;
  c.flags.freeze_below = s.has_freeze_below;
  c.flags.amsgrad = s.amsgrad;
  c.flags.fisher_scale = s.has_fisher && s.fisher_scale != 0.0;
  c.k.lerp_weight = static_cast<float>(1.0 - s.beta1);
  // torch's lerp takes its weight in fp32 and picks a formula by |weight| < 0.5.
  c.flags.lerp_small = std::fabs(c.k.lerp_weight) < 0.5f;
  c.k.lerp_weight_minus_1 = c.k.lerp_weight - 1.0f;
  c.k.beta2 = static_cast<float>(s.beta2);
  c.k.beta2_weight = static_cast<float>(1.0 - s.beta2);
  c.k.eps = static_cast<float>(s.eps);
  c.k.fisher_scale = static_cast<float>(s.fisher_scale);
  c.k.freeze_above = static_cast<float>(s.freeze_above);
  c.k.freeze_below = static_cast<float>(s.freeze_below);
  c.k.one = 1.0f;
  const bool ema = s.fisher_mode == FisherMode::kEma;
  c.fisher_a = ema ? static_cast<float>(s.fisher_beta) : 1.0f;
  c.fisher_b = ema ? static_cast<float>(1.0 - s.fisher_beta) : 1.0f;
  // Python evaluates 1 - lr * weight_decay in double with two roundings; volatile keeps a host
  // compiler from contracting it into one fused multiply-add (aarch64 hosts would).
  volatile double lr_times_decay = s.lr * s.weight_decay;
  c.decay_host = static_cast<float>(1.0 - lr_times_decay);
  c.weight_decay = static_cast<float>(s.weight_decay);
  return c;
}

// The learning rate of a call and 1 - lr * weight_decay, rounded as the reference rounds it: in
// double for a Python float or a float64 tensor, in fp32 for an fp32 tensor (bf16/fp16 widened
// first). `tensor_value` is the lr tensor's value (read by the caller, which knows where it
// lives), unused for a host lr.
struct LrDecay {
  double lr;
  float decay;
};
FF_MATH_FN LrDecay lr_decay(const StepCall& c, double tensor_value) {
  switch (c.settings.lr_kind) {
    case LrKind::kHost:
      return {c.settings.lr, c.decay_host};
    case LrKind::kFloat64:
      return {tensor_value, static_cast<float>(math::sub(
                                1.0, math::mul(tensor_value, c.settings.weight_decay)))};
    default: {
      const float value = static_cast<float>(tensor_value);
      return {value, math::sub(1.0f, math::mul(value, c.weight_decay))};
    }
  }
}

// The bias corrections of a tensor whose step count is `step` before this step (t = step + 1,
// fp32 as the reference counts), in double.
struct BiasCorrections {
  double bias_correction1;       // 1 - beta1^t
  float bias_correction2_sqrt;   // (float)sqrt(1 - beta2^t)
  float t;
};
FF_MATH_FN BiasCorrections bias_corrections(const StepCall& c, float step) {
  const float t = math::add(step, 1.0f);
  return {1.0 - ::pow(c.settings.beta1, static_cast<double>(t)),
          static_cast<float>(::sqrt(1.0 - ::pow(c.settings.beta2, static_cast<double>(t)))), t};
}

// Everything of one tensor's step that is not per element.
struct TensorConsts {
  math::StepTensorConsts<float> lane;
  uint32_t fisher_key;  // math::fisher_key(count after this step): a bf16 Fisher's random bits
};
// `fisher_count` is the tensor's count before this step (read only when the Fisher accumulates),
// `grad_scale` the call's (1 without one).
FF_MATH_FN TensorConsts tensor_consts(const StepCall& c, LrDecay lr, BiasCorrections bias,
                                      const float* fisher_count, float grad_scale) {
  TensorConsts out;
  out.lane.decay = lr.decay;
  out.lane.step_size = static_cast<float>(lr.lr / bias.bias_correction1);
  out.lane.bias_correction2_sqrt = bias.bias_correction2_sqrt;
  out.lane.fisher_a = c.fisher_a;
  out.lane.fisher_b = c.fisher_b;
  out.lane.grad_scale = grad_scale;
  out.fisher_key = 0u;
  if (c.flags.accumulate) {
    // n = count + 1 accumulations including this one.
    const float n = math::add(*fisher_count, 1.0f);
    out.fisher_key = math::fisher_key(n);
    if (c.settings.fisher_mode == FisherMode::kMean) {  // F = (n-1)/n * F + 1/n * g^2
      out.lane.fisher_a = math::div(math::sub(n, 1.0f), n);
      out.lane.fisher_b = math::div(1.0f, n);
    }
  }
  return out;
}

// Where the kernels run: a CUDA stream, or the host, executing the same per-thread code one
// simulated thread at a time (slow; for testing on machines without a GPU, with host pointers).
struct ExecTarget {
  bool emulate_on_host = false;
  void* stream = nullptr;  // cudaStream_t
  // false: plan every launch (tables, grids) but run nothing; the host-overhead benchmark times
  // the host work of a step this way, on CPU tensors (fused_step only).
  bool launch = true;
};

// One fused Fisher-AdamW step over `num_tensors` tensors of one dtype combination.
struct FusedStepProblem {
  int64_t num_tensors = 0;
  const int64_t* numels = nullptr;
  DType param_dtype = DType::kFloat32;   // params and grads
  DType state_dtype = DType::kFloat32;   // exp_avg, exp_avg_sq, max_exp_avg_sq
  DType fisher_dtype = DType::kFloat32;  // fisher (ignored without fishers)

  void* const* params = nullptr;
  const void* const* grads = nullptr;
  void* const* exp_avgs = nullptr;
  void* const* exp_avg_sqs = nullptr;
  void* const* max_exp_avg_sqs = nullptr;  // required when amsgrad
  void* const* fishers = nullptr;          // null: no Fisher is used or accumulated
  const bool* const* masks = nullptr;      // null, or an array whose entries may be null
  float* const* steps = nullptr;           // 0-dim fp32 step counts, incremented unless found_inf
  float* const* fisher_counts = nullptr;   // required when fishers and fisher_mode != kNone

  StepSettings settings;  // its has_fisher is fishers != nullptr
};

void fused_step(const FusedStepProblem& problem, const ExecTarget& target);

// F = alpha * F + beta * (g / grad_scale)^2 over `num_tensors` tensors.
struct FisherAccumulateProblem {
  int64_t num_tensors = 0;
  const int64_t* numels = nullptr;
  DType fisher_dtype = DType::kFloat32;
  DType grad_dtype = DType::kFloat32;
  void* const* fishers = nullptr;
  const void* const* grads = nullptr;
  double alpha = 1.0, beta = 1.0;
  const float* grad_scale = nullptr;
};

void fisher_accumulate(const FisherAccumulateProblem& problem, const ExecTarget& target);

// Per-block partial sums of <d, g> and sum F g^2 (float64), written to
// partials[2 * (first_block + b) + {0, 1}] for the b-th chunk of this problem's tensors.
// A later fisher_score_finalize sums every partial in a fixed order: no float atomics, so the
// result is the same bit for bit on every run.
struct FisherScoreProblem {
  int64_t num_tensors = 0;
  const int64_t* numels = nullptr;
  DType direction_dtype = DType::kFloat32;
  DType grad_dtype = DType::kFloat32;
  DType fisher_dtype = DType::kFloat32;
  const void* const* directions = nullptr;
  const void* const* grads = nullptr;
  const void* const* fishers = nullptr;
  double* partials = nullptr;
  int64_t first_block = 0;
};

// Number of partial-sum blocks (chunks) that fisher_score_partials uses for these tensors.
int64_t fisher_score_num_blocks(int64_t num_tensors, const int64_t* numels);
void fisher_score_partials(const FisherScoreProblem& problem, const ExecTarget& target);
// out[0] = sum of partials[2b], out[1] = sum of partials[2b + 1], b < num_blocks, fixed order.
void fisher_score_finalize(const double* partials, int64_t num_blocks, double* out,
                           const ExecTarget& target);

// Build facts of the compiled kernels: the CUDA architectures (e.g. "800,900") and the CUDA
// version they were compiled with.
const char* compiled_cuda_archs();
int compiled_cuda_version();

}  // namespace fisherforget
