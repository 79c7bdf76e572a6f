// The native CPU kernels of the three ops (csrc/cpu/*.cpp), for CPU tensors.
//
// The binding (csrc/bindings.cpp) checks the tensors and fills one table entry per tensor; each op
// is then one call over the whole table: the elements of all tensors are treated as one range, cut
// between the threads (at::parallel_for) by element count, so many small tensors cost no more
// than one large one. Inner loops run 8 fp32 lanes at a time with AVX2/FMA/F16C when the CPU has
// them (selected once at load time), else a scalar loop; both evaluate the same per-element
// template (csrc/ff_math.h), so their results are identical bit for bit.
#pragma once

#include <cstdint>

#include "ff_kernels.h"  // DType, FisherMode, LrKind, StepSettings

namespace fisherforget {
namespace cpu {

// One tensor of a fused step. All pointers are to contiguous CPU memory of `numel` elements.
struct StepEntry {
  void* param;
  const void* grad;            // param_dtype
  void* exp_avg;               // state_dtype, as exp_avg_sq and max_exp_avg_sq
  void* exp_avg_sq;
  void* max_exp_avg_sq;        // null unless amsgrad
  void* fisher;                // fisher_dtype; null without fishers
  const bool* mask;            // null: no mask
  float* step;                 // 0-dim fp32, incremented unless found_inf
  float* fisher_count;         // 0-dim fp32; null unless the Fisher accumulates
  int64_t numel;
  DType param_dtype, state_dtype, fisher_dtype;
};

// One Fisher-AdamW step over `num_tensors` entries (any mix of supported dtypes): params,
// moments and Fisher updated in place, then the step (and Fisher) counts incremented; nothing at
// all when *found_inf > 0. Supported: params fp32/bf16/fp16, state and Fisher fp32/bf16.
void fused_step(const StepEntry* entries, int64_t num_tensors, const StepSettings& settings);

// F = alpha * F + beta * (g / grad_scale)^2 for each entry.
struct AccumulateEntry {
  void* fisher;      // fisher_dtype: fp32/bf16
  const void* grad;  // grad_dtype: fp32/bf16/fp16
  int64_t numel;
  DType fisher_dtype, grad_dtype;
};
void fisher_accumulate(const AccumulateEntry* entries, int64_t num_tensors, double alpha,
                       double beta, const float* grad_scale);

// out[0] = sum <d, g>, out[1] = sum F g^2 over all entries, in float64. Deterministic: the
// elements (all entries in order, as one range) are cut into fixed chunks of kScoreChunk; each
// chunk is reduced in a fixed lane order and the chunk sums are added in chunk order, so the
// result does not depend on the number of threads.
struct ScoreEntry {
  const void* direction;  // fp32/bf16/fp16
  const void* grad;       // fp32/bf16/fp16
  const void* fisher;     // fp32/bf16
  int64_t numel;
  DType direction_dtype, grad_dtype, fisher_dtype;
};
constexpr int64_t kScoreChunk = 16384;
void fisher_score(const ScoreEntry* entries, int64_t num_tensors, double* out);

// Which inner loops run: "avx2" (AVX2 + FMA + F16C, 8 lanes) or "scalar". Chosen once from the
// CPU's features; set_isa (tests, benchmarks) forces one, returning false when this CPU or
// build cannot run it.
const char* isa();
bool set_isa(const char* name);

}  // namespace cpu
}  // namespace fisherforget
