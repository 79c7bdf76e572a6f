// The per-element math of one Fisher-AdamW step (docs/design.md section 2), written once as a
// template over the lane type V: `float` (one element: the CPU scalar path, and the CUDA kernels
// and their host emulation) or a SIMD vector of floats (the CPU AVX2 path,
// csrc/cpu/kernels_avx2.cpp). Torch-free and CUDA-free, so g++ compiles it without a toolkit;
// under nvcc the functions are __host__ __device__.
//
// The order of fp32 operations is the reference backend's (fisherforget/backends/reference.py),
// one op at a time, each rounded to fp32. The two moment updates round as torch's own kernels on
// the device do (MomentRounding): its CPU kernels fuse a multiply-add (single rounding), which
// `fma` reproduces, its CUDA kernels round every product:
//                          kFused (CPU)                        kSeparate (CUDA)
//   lerp(m, g, w), |w|<.5  fma(w, g - m, m)                    m + w * (g - m)
//   lerp, otherwise        fma(w - 1, g - m, g)                g - (g - m) * (1 - w)
//   addcmul v*b2+(1-b2)g^2 fma((1 - b2) * g, g, v * b2)        v * b2 + (1 - b2) * (g * g)
// so that each kernel rounds the moments as the reference does on its device. Everything else
// (the Fisher update, which decides freezing, in particular) is separately rounded products and
// sums.
//
// A lane type provides: add, sub, mul, div, fma, neg, sqrt, max_nan (NaN-propagating maximum, as
// torch.maximum), gt, lt (ordered compares giving a mask), mask_or, mask_not and select(mask, a, b)
// (a where mask, else b). The float overloads are below.
#pragma once

// Internal linkage (static): a translation unit that compiles these for a wider instruction set
// (csrc/cpu/kernels_avx2.cpp) keeps its own copies, which the linker can never substitute for the
// baseline ones of another unit.
#if defined(__CUDACC__)
#define FF_MATH_FN static __host__ __device__ __forceinline__
#else
#define FF_MATH_FN static inline
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fisherforget {
namespace math {

// ---------------------------------------------------------- stochastic rounding of a bf16 Fisher
// A bf16 Fisher is stored with stochastic rounding, so that accumulation increments under half an
// ulp are kept in expectation instead of rounded away (docs/design.md, "Low-precision Fisher").
// The random bits are a hash of the tensor's Fisher count after this step and the element's index
// in the tensor: reproducible, identical on every backend (fisherforget/backends/reference.py
// computes the same bits), nothing to seed or save.
//   key = mix32(count)        r = mix32(uint32(index) ^ key) & 0xFFFF
//   bf16 bits = (bits(x) + r) >> 16                       (NaN: 0x7FC0, as torch's conversion)
FF_MATH_FN uint32_t mix32(uint32_t x) {  // "lowbias32" (C. Wellons): a full-avalanche mixer
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}
FF_MATH_FN uint32_t fisher_key(float count_after) {
  return mix32(static_cast<uint32_t>(count_after));
}
FF_MATH_FN uint16_t bf16_bits_stochastic(float x, uint32_t key, int64_t index) {
  if (x != x) return 0x7FC0;
#ifdef __CUDA_ARCH__
  const uint32_t bits = __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
#endif
  const uint32_t r = mix32(static_cast<uint32_t>(index) ^ key) & 0xFFFFu;
  return static_cast<uint16_t>((bits + r) >> 16);
}

// ------------------------------------------------------------------------- float lanes (scalar)
// a OP b, each rounded once, in fp32 and fp64 (the fp64 ones: the per-call and per-tensor
// constants, the Fisher score's sums). On the device the _rn intrinsics keep nvcc from
// contracting a*b+c into one rounding; host code is compiled with -ffp-contract=off (setup.py)
// for the same reason.
#ifdef __CUDA_ARCH__
#define FF_ROUNDED_OP(name, op, f32_rn, f64_rn)                              \
  FF_MATH_FN float name(float a, float b) { return f32_rn(a, b); }           \
  FF_MATH_FN double name(double a, double b) { return f64_rn(a, b); }
#else
#define FF_ROUNDED_OP(name, op, f32_rn, f64_rn)                              \
  FF_MATH_FN float name(float a, float b) { return a op b; }                 \
  FF_MATH_FN double name(double a, double b) { return a op b; }
#endif
FF_ROUNDED_OP(add, +, __fadd_rn, __dadd_rn)
FF_ROUNDED_OP(sub, -, __fsub_rn, __dsub_rn)
FF_ROUNDED_OP(mul, *, __fmul_rn, __dmul_rn)
FF_ROUNDED_OP(div, /, __fdiv_rn, __ddiv_rn)
#undef FF_ROUNDED_OP

// a * b + c with one rounding (a library call where the CPU lacks FMA: slow but exact).
FF_MATH_FN float fma(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
FF_MATH_FN float neg(float a) { return -a; }
FF_MATH_FN float sqrt(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
FF_MATH_FN float max_nan(float a, float b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}
FF_MATH_FN bool gt(float a, float b) { return a > b; }
FF_MATH_FN bool lt(float a, float b) { return a < b; }
FF_MATH_FN bool mask_or(bool a, bool b) { return a || b; }
FF_MATH_FN bool mask_not(bool a) { return !a; }
FF_MATH_FN float select(bool mask, float a, float b) { return mask ? a : b; }

// ------------------------------------------------------------------------------------ the step

// Switches that hold for a whole call (the branches on them are uniform).
struct StepFlags {
  bool scaled_grad;   // divide the gradient by grad_scale
  bool maximize;      // ascend: g = -g
  bool accumulate;    // F = a*F + b*g^2 (fishers present and fisher_mode set)
  bool freeze_above;  // freeze where F > above
  bool freeze_below;  // freeze where F < below
  bool amsgrad;       // the denominator uses max(vmax, v)
  bool fisher_scale;  // update /= 1 + fisher_scale * F (fishers present, fisher_scale != 0)
  bool lerp_small;    // |1 - beta1| < 0.5: which of torch's two lerp formulas applies
};

// The same switches fixed at compile time for the most common step: AdamW, with the Fisher
// accumulated or not, nothing else (a loop instantiated with these has no branches on the
// switches; the general one tests them per group, which costs instruction issue slots).
template <bool kAccumulate>
struct PlainStepFlags {
  static constexpr bool scaled_grad = false, maximize = false, accumulate = kAccumulate,
                        freeze_above = false, freeze_below = false, amsgrad = false,
                        fisher_scale = false, lerp_small = true;
};

// Whether a call with switches `f` is the plain step (PlainStepFlags<f.accumulate>).
FF_MATH_FN bool is_plain(const StepFlags& f) {
  return !f.scaled_grad && !f.maximize && !f.freeze_above && !f.freeze_below && !f.amsgrad &&
         !f.fisher_scale && f.lerp_small;
}

// Whether an element of a tensor can be frozen: it has a mask, or a threshold is set.
template <typename Flags>
FF_MATH_FN bool may_freeze(const Flags& f, bool has_mask) {
  return has_mask || f.freeze_above || f.freeze_below;
}

// Whether the step reads the Fisher (to accumulate it, scale by it, or freeze by it).
template <typename Flags>
FF_MATH_FN bool reads_fisher(const Flags& f) {
  return f.accumulate || f.fisher_scale || f.freeze_above || f.freeze_below;
}

// Per-call constants, as lanes: StepCall (ff_kernels.h) holds them as floats, and a vector path
// broadcasts them once per call (broadcast_consts).
template <typename V>
struct StepCallConsts {
  V lerp_weight;          // (float)(1 - beta1)
  V lerp_weight_minus_1;  // lerp_weight - 1 (torch's large-weight formula)
  V beta2;                // (float)beta2
  V beta2_weight;         // (float)(1 - beta2)
  V eps;
  V fisher_scale;
  V freeze_above, freeze_below;
  V one;
};

// Per-tensor constants (they depend on the tensor's step and Fisher counts: tensor_consts in
// ff_kernels.h).
template <typename V>
struct StepTensorConsts {
  V decay;                  // 1 - lr * weight_decay
  V step_size;              // lr / (1 - beta1^t)
  V bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  V fisher_a, fisher_b;     // F = a*F + b*g^2
  V grad_scale;
};

// The float constants as lanes of type V: `lane(x)` makes a lane holding x everywhere.
template <typename V, typename Lane>
FF_MATH_FN StepCallConsts<V> broadcast_consts(const StepCallConsts<float>& k, Lane lane) {
  return {lane(k.lerp_weight), lane(k.lerp_weight_minus_1), lane(k.beta2), lane(k.beta2_weight),
          lane(k.eps), lane(k.fisher_scale), lane(k.freeze_above), lane(k.freeze_below),
          lane(k.one)};
}
template <typename V, typename Lane>
FF_MATH_FN StepTensorConsts<V> broadcast_consts(const StepTensorConsts<float>& c, Lane lane) {
  return {lane(c.decay), lane(c.step_size), lane(c.bias_correction2_sqrt), lane(c.fisher_a),
          lane(c.fisher_b), lane(c.grad_scale)};
}

// How the two moment updates round (the table at the top of this file).
enum class MomentRounding { kFused, kSeparate };

// One step of one lane. `f` is a StepFlags or a PlainStepFlags. `may_update` is the mask (true:
// the element may change); `may_freeze` says whether anything can freeze here (a mask or a
// threshold: may_freeze()), else the selects are skipped.
// On return p, m, v, vmax hold the new values (the old ones where frozen) and fisher the new
// Fisher (every element accumulates, frozen or not). Returns the frozen lanes.
template <MomentRounding kRounding, typename V, typename M, typename Flags>
FF_MATH_FN M step_lane(const Flags& f, const StepCallConsts<V>& k, const StepTensorConsts<V>& c,
                       bool may_freeze, M may_update, V grad, V& p, V& m, V& v, V& vmax,
                       V& fisher) {
  V g = grad;
  if (f.scaled_grad) g = div(g, c.grad_scale);
  if (f.maximize) g = neg(g);
  const V g2 = mul(g, g);
  V fisher_new = fisher;
  if (f.accumulate) fisher_new = add(mul(c.fisher_a, fisher), mul(c.fisher_b, g2));

  const V p_new = mul(p, c.decay);
  const V diff = sub(g, m);
  V m_new, v_new;
  if (kRounding == MomentRounding::kFused) {
    m_new = f.lerp_small ? fma(k.lerp_weight, diff, m) : fma(k.lerp_weight_minus_1, diff, g);
    v_new = fma(mul(k.beta2_weight, g), g, mul(v, k.beta2));
  } else {
    m_new = f.lerp_small ? add(m, mul(k.lerp_weight, diff))
                         : sub(g, mul(diff, sub(k.one, k.lerp_weight)));
    v_new = add(mul(v, k.beta2), mul(k.beta2_weight, g2));
  }
  V second_moment = v_new;
  V vmax_new = vmax;
  if (f.amsgrad) {
    vmax_new = max_nan(vmax, v_new);
    second_moment = vmax_new;
  }
  const V denom = add(div(sqrt(second_moment), c.bias_correction2_sqrt), k.eps);
  V update = div(m_new, denom);
  if (f.fisher_scale) update = div(update, add(k.one, mul(k.fisher_scale, fisher_new)));
  const V p_stepped = sub(p_new, mul(c.step_size, update));

  fisher = fisher_new;
  M frozen = mask_not(may_update);
  if (may_freeze) {
    if (f.freeze_above) frozen = mask_or(frozen, gt(fisher_new, k.freeze_above));
    if (f.freeze_below) frozen = mask_or(frozen, lt(fisher_new, k.freeze_below));
    p = select(frozen, p, p_stepped);
    m = select(frozen, m, m_new);
    v = select(frozen, v, v_new);
    if (f.amsgrad) vmax = select(frozen, vmax, vmax_new);
  } else {
    p = p_stepped;
    m = m_new;
    v = v_new;
    vmax = vmax_new;
  }
  return frozen;
}

// fisher_accumulate: F = a*F + b*(g / grad_scale)^2, separately rounded as in the reference.
template <typename V>
FF_MATH_FN V accumulate_lane(bool scaled_grad, V grad_scale, V a, V b, V fisher, V grad) {
  V g = grad;
  if (scaled_grad) g = div(g, grad_scale);
  return add(mul(a, fisher), mul(b, mul(g, g)));
}

}  // namespace math
}  // namespace fisherforget
