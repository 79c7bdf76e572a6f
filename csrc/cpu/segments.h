// Internal interface between the CPU kernel driver (kernels.cpp: threads, per-tensor constants,
// counts) and the inner loops over one contiguous piece of one tensor, which exist once per
// instruction set: scalar (kernels.cpp) and AVX2 (kernels_avx2.cpp, x86-64 only).
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/ff_cpu.h"
#include "ff_math.h"

namespace fisherforget {
namespace cpu {

// A Fisher value as stored: fp32 as is, bf16 stochastically rounded (ff_math.h); `index` is the
// element's position in its tensor.
static inline float fisher_to_store(float x, uint32_t, int64_t, const float*) { return x; }
static inline c10::BFloat16 fisher_to_store(float x, uint32_t key, int64_t index,
                                            const c10::BFloat16*) {
  return c10::BFloat16(math::bf16_bits_stochastic(x, key, index), c10::BFloat16::from_bits());
}

// Elements [begin, end) of one tensor (StepCall and TensorConsts: ff_kernels.h).
using StepSegmentFn = void (*)(const StepCall& call, const StepEntry& entry,
                               const TensorConsts& consts, int64_t begin, int64_t end);
// F = alpha*F + beta*(g / grad_scale)^2 (no division when !scaled).
struct AccumulateCall {
  bool scaled;
  float grad_scale, alpha, beta;
};
using AccumulateSegmentFn = void (*)(const AccumulateCall& call, const AccumulateEntry& entry,
                                     int64_t begin, int64_t end);
// Adds elements [begin, end) of one tensor to 8 float64 lanes per sum, element begin + 8j + l to
// lane l (a fixed assignment: the result does not depend on the instruction set).
using ScoreSegmentFn = void (*)(const ScoreEntry& entry, int64_t begin, int64_t end,
                                double dot[8], double weighted[8]);

// Picks Loops::template step<P, S, F> etc. for the runtime dtypes (null: unsupported). Each
// instruction set's unit instantiates these with its own (internal) Loops type.
template <typename Loops>
static inline StepSegmentFn pick_step(DType param, DType state, DType fisher) {
  const bool state_bf16 = state == DType::kBFloat16, fisher_bf16 = fisher == DType::kBFloat16;
  if ((state != DType::kFloat32 && !state_bf16) || (fisher != DType::kFloat32 && !fisher_bf16)) {
    return nullptr;
  }
  using BF = c10::BFloat16;
#define FF_PICK_STEP(P)                                                              \
  return state_bf16 ? (fisher_bf16 ? &Loops::template step<P, BF, BF> : &Loops::template step<P, BF, float>) \
                    : (fisher_bf16 ? &Loops::template step<P, float, BF>            \
                                   : &Loops::template step<P, float, float>)
  switch (param) {
    case DType::kFloat32:
      FF_PICK_STEP(float);
    case DType::kBFloat16:
      FF_PICK_STEP(BF);
    case DType::kFloat16:
      FF_PICK_STEP(c10::Half);
  }
#undef FF_PICK_STEP
  return nullptr;
}

template <typename Loops, typename F>
static inline AccumulateSegmentFn pick_accumulate_grad(DType grad) {
  switch (grad) {
    case DType::kFloat32:
      return &Loops::template accumulate<F, float>;
    case DType::kBFloat16:
      return &Loops::template accumulate<F, c10::BFloat16>;
    case DType::kFloat16:
      return &Loops::template accumulate<F, c10::Half>;
  }
  return nullptr;
}

template <typename Loops>
static inline AccumulateSegmentFn pick_accumulate(DType fisher, DType grad) {
  if (fisher == DType::kFloat32) return pick_accumulate_grad<Loops, float>(grad);
  if (fisher == DType::kBFloat16) return pick_accumulate_grad<Loops, c10::BFloat16>(grad);
  return nullptr;
}

template <typename Loops, typename D, typename G>
static inline ScoreSegmentFn pick_score_fisher(DType fisher) {
  if (fisher == DType::kFloat32) return &Loops::template score<D, G, float>;
  if (fisher == DType::kBFloat16) return &Loops::template score<D, G, c10::BFloat16>;
  return nullptr;
}

template <typename Loops, typename D>
static inline ScoreSegmentFn pick_score_grad(DType grad, DType fisher) {
  switch (grad) {
    case DType::kFloat32:
      return pick_score_fisher<Loops, D, float>(fisher);
    case DType::kBFloat16:
      return pick_score_fisher<Loops, D, c10::BFloat16>(fisher);
    case DType::kFloat16:
      return pick_score_fisher<Loops, D, c10::Half>(fisher);
  }
  return nullptr;
}

template <typename Loops>
static inline ScoreSegmentFn pick_score(DType direction, DType grad, DType fisher) {
  switch (direction) {
    case DType::kFloat32:
      return pick_score_grad<Loops, float>(grad, fisher);
    case DType::kBFloat16:
      return pick_score_grad<Loops, c10::BFloat16>(grad, fisher);
    case DType::kFloat16:
      return pick_score_grad<Loops, c10::Half>(grad, fisher);
  }
  return nullptr;
}

// The inner loops for these dtypes, or null when the combination is not supported.
StepSegmentFn step_segment_scalar(DType param, DType state, DType fisher);
AccumulateSegmentFn accumulate_segment_scalar(DType fisher, DType grad);
ScoreSegmentFn score_segment_scalar(DType direction, DType grad, DType fisher);

#if defined(__x86_64__) || defined(_M_X64)
#define FF_CPU_HAVE_AVX2 1
StepSegmentFn step_segment_avx2(DType param, DType state, DType fisher);
AccumulateSegmentFn accumulate_segment_avx2(DType fisher, DType grad);
ScoreSegmentFn score_segment_avx2(DType direction, DType grad, DType fisher);
#endif

}  // namespace cpu
}  // namespace fisherforget
