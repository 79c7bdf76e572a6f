// The AVX2 inner loops (8 fp32 lanes, FMA, F16C conversions), x86-64 only.
//
// This unit is compiled with the baseline flags like every other: only the code between the
// target push/pop below is built for AVX2, and it is all internal (static or in an anonymous
// namespace), so no AVX2 copy of an inline function can replace a baseline one elsewhere. The
// driver (kernels.cpp) calls in here only when the CPU reports AVX2, FMA and F16C.
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#include "cpu/segments.h"

namespace fisherforget {
namespace cpu {
namespace {

#define FF_AVX2 __attribute__((always_inline)) inline

// -------------------------------------------------------------------------------- lane types
struct Vf8 {
  __m256 v;
};
struct Mf8 {  // all-ones / all-zeros per lane
  __m256 v;
};

FF_AVX2 Vf8 broadcast(float x) { return {_mm256_set1_ps(x)}; }

// The ff_math.h lane operations (found by argument-dependent lookup).
FF_AVX2 Vf8 add(Vf8 a, Vf8 b) { return {_mm256_add_ps(a.v, b.v)}; }
FF_AVX2 Vf8 sub(Vf8 a, Vf8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
FF_AVX2 Vf8 mul(Vf8 a, Vf8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
FF_AVX2 Vf8 div(Vf8 a, Vf8 b) { return {_mm256_div_ps(a.v, b.v)}; }
FF_AVX2 Vf8 fma(Vf8 a, Vf8 b, Vf8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
FF_AVX2 Vf8 neg(Vf8 a) { return {_mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f))}; }
FF_AVX2 Vf8 sqrt(Vf8 a) { return {_mm256_sqrt_ps(a.v)}; }
// maxps returns its second operand when either is NaN; a NaN first operand is put back, so the
// result is as the scalar max_nan's (a if a is NaN, else b if b is NaN, else the larger).
FF_AVX2 Vf8 max_nan(Vf8 a, Vf8 b) {
  const __m256 larger = _mm256_max_ps(a.v, b.v);
  return {_mm256_blendv_ps(larger, a.v, _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q))};
}
FF_AVX2 Mf8 gt(Vf8 a, Vf8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
FF_AVX2 Mf8 lt(Vf8 a, Vf8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
FF_AVX2 Mf8 mask_or(Mf8 a, Mf8 b) { return {_mm256_or_ps(a.v, b.v)}; }
FF_AVX2 Mf8 mask_not(Mf8 a) {
  return {_mm256_xor_ps(a.v, _mm256_castsi256_ps(_mm256_set1_epi32(-1)))};
}
FF_AVX2 Vf8 select(Mf8 mask, Vf8 a, Vf8 b) { return {_mm256_blendv_ps(b.v, a.v, mask.v)}; }

// --------------------------------------------------------------------------- loads and stores
// Unaligned 8-element loads/stores. Conversions round as torch's (c10) do: bf16 and fp16 widen
// exactly; narrowing is round-to-nearest-even, NaN -> the canonical bf16 NaN 0x7FC0.
FF_AVX2 Vf8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
FF_AVX2 Vf8 load(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
}
FF_AVX2 Vf8 load(const c10::Half* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}

FF_AVX2 void store(float* p, Vf8 x) { _mm256_storeu_ps(p, x.v); }
FF_AVX2 void store(c10::BFloat16* p, Vf8 x) {
  const __m256i bits = _mm256_castps_si256(x.v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  // packus works within 128-bit halves: [r0..r3 r0..r3 | r4..r7 r4..r7]; gather 64-bit parts 0, 2.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
// A Fisher as stored (segments.h fisher_to_store): fp32 as is; bf16 stochastically rounded with
// the random bits of elements index .. index + 7 (ff_math.h), NaN -> 0x7FC0 as the scalar loop.
FF_AVX2 void store_fisher(float* p, Vf8 x, int64_t, uint32_t) { store(p, x); }
FF_AVX2 __m256i mix32(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
FF_AVX2 void store_fisher(c10::BFloat16* p, Vf8 x, int64_t index, uint32_t key) {
  const __m256i lanes = _mm256_add_epi32(
      _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(index))),
      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i random = _mm256_and_si256(
      mix32(_mm256_xor_si256(lanes, _mm256_set1_epi32(static_cast<int>(key)))),
      _mm256_set1_epi32(0xFFFF));
  __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(x.v), random), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

FF_AVX2 void store(c10::Half* p, Vf8 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Eight bool bytes (0/1) as a lane mask.
FF_AVX2 Mf8 load_mask(const bool* p) {
  const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(wide, _mm256_setzero_si256()))};
}

// Copies n < 8 elements into a zero-padded 8-element buffer (and back): the tails run the same
// vector code as the body. Fixed 8-iteration loops (unrolled, no library call): a memcpy per
// array would cost more than the whole step of a one-element tensor.
template <typename T>
struct Tail {
  T v[8];
  FF_AVX2 void fill(const T* src, int64_t n) {
#pragma GCC unroll 8
    for (int64_t i = 0; i < 8; ++i) v[i] = (src != nullptr && i < n) ? src[i] : T(0);
  }
  FF_AVX2 void drain(T* dst, int64_t n) const {
    if (dst == nullptr) return;
#pragma GCC unroll 8
    for (int64_t i = 0; i < 8; ++i) {
      if (i < n) dst[i] = v[i];
    }
  }
};

// ------------------------------------------------------------------------------------ loops
struct Loops {
  // ------------------------------------------------------------------------------ fused step
  template <typename P, typename S, typename F>
  struct StepPointers {
    P* param;
    const P* grad;
    S *exp_avg, *exp_avg_sq, *max_exp_avg_sq;
    F* fisher;
    const bool* mask;
    int64_t index;        // the position in the tensor of the element `param` points at
    uint32_t fisher_key;  // TensorConsts::fisher_key
  };

  template <typename P, typename S, typename F, typename Flags>
  FF_AVX2 static void step_group(const Flags& f, const math::StepCallConsts<Vf8>& k,
                                 const math::StepTensorConsts<Vf8>& c, bool may_freeze,
                                 const StepPointers<P, S, F>& at) {
    const Vf8 grad = load(at.grad);
    Vf8 p = load(at.param), m = load(at.exp_avg), v = load(at.exp_avg_sq);
    Vf8 vmax = f.amsgrad ? load(at.max_exp_avg_sq) : Vf8{_mm256_setzero_ps()};
    // Tested on the switches, not the pointers: with compile-time switches these fold away.
    Vf8 fisher = math::reads_fisher(f) ? load(at.fisher) : Vf8{_mm256_setzero_ps()};
    const Mf8 may_update = may_freeze && at.mask != nullptr
                               ? load_mask(at.mask)
                               : Mf8{_mm256_castsi256_ps(_mm256_set1_epi32(-1))};
    math::step_lane<math::MomentRounding::kFused>(f, k, c, may_freeze, may_update, grad, p, m, v,
                                                  vmax, fisher);
    store(at.param, p);
    store(at.exp_avg, m);
    store(at.exp_avg_sq, v);
    if (f.amsgrad) store(at.max_exp_avg_sq, vmax);
    if (f.accumulate) store_fisher(at.fisher, fisher, at.index, at.fisher_key);
  }

  template <typename P, typename S, typename F>
  static void step(const StepCall& call, const StepEntry& e, const TensorConsts& tc,
                   int64_t begin, int64_t end) {
    const auto lane = [](float x) { return broadcast(x); };
    const math::StepCallConsts<Vf8> k = math::broadcast_consts<Vf8>(call.k, lane);
    const math::StepTensorConsts<Vf8> c = math::broadcast_consts<Vf8>(tc.lane, lane);

    StepPointers<P, S, F> at;
    at.param = static_cast<P*>(e.param) + begin;
    at.grad = static_cast<const P*>(e.grad) + begin;
    at.exp_avg = static_cast<S*>(e.exp_avg) + begin;
    at.exp_avg_sq = static_cast<S*>(e.exp_avg_sq) + begin;
    at.max_exp_avg_sq = call.flags.amsgrad ? static_cast<S*>(e.max_exp_avg_sq) + begin : nullptr;
    at.fisher = e.fisher != nullptr ? static_cast<F*>(e.fisher) + begin : nullptr;
    at.mask = e.mask != nullptr ? e.mask + begin : nullptr;
    at.index = begin;
    at.fisher_key = tc.fisher_key;
    const int64_t n = end - begin;
    if (e.mask == nullptr && math::is_plain(call.flags)) {
      if (call.flags.accumulate) {
        run_step(math::PlainStepFlags<true>{}, k, c, false, at, n);
      } else {
        at.fisher = nullptr;  // unused by the plain step without accumulation
        run_step(math::PlainStepFlags<false>{}, k, c, false, at, n);
      }
    } else {
      run_step(call.flags, k, c, math::may_freeze(call.flags, e.mask != nullptr), at, n);
    }
  }

  template <typename P, typename S, typename F, typename Flags>
  FF_AVX2 static void run_step(const Flags& f, const math::StepCallConsts<Vf8>& k,
                               const math::StepTensorConsts<Vf8>& c, bool may_freeze,
                               StepPointers<P, S, F> at, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      step_group(f, k, c, may_freeze, at);
      at.param += 8;
      at.grad += 8;
      at.exp_avg += 8;
      at.exp_avg_sq += 8;
      if (f.amsgrad) at.max_exp_avg_sq += 8;
      if (at.fisher != nullptr) at.fisher += 8;
      if (at.mask != nullptr) at.mask += 8;
      at.index += 8;
    }
    const int64_t r = n - i;
    if (r == 0) return;
    Tail<P> param, grad;
    Tail<S> exp_avg, exp_avg_sq, max_exp_avg_sq;
    Tail<F> fisher;
    Tail<bool> mask;
    param.fill(at.param, r);
    grad.fill(at.grad, r);
    exp_avg.fill(at.exp_avg, r);
    exp_avg_sq.fill(at.exp_avg_sq, r);
    max_exp_avg_sq.fill(at.max_exp_avg_sq, r);
    fisher.fill(at.fisher, r);
    mask.fill(at.mask, r);
    StepPointers<P, S, F> buffers{param.v,
                                  grad.v,
                                  exp_avg.v,
                                  exp_avg_sq.v,
                                  at.max_exp_avg_sq != nullptr ? max_exp_avg_sq.v : nullptr,
                                  at.fisher != nullptr ? fisher.v : nullptr,
                                  at.mask != nullptr ? mask.v : nullptr,
                                  at.index,
                                  at.fisher_key};
    step_group(f, k, c, may_freeze, buffers);
    param.drain(at.param, r);
    exp_avg.drain(at.exp_avg, r);
    exp_avg_sq.drain(at.exp_avg_sq, r);
    max_exp_avg_sq.drain(at.max_exp_avg_sq, r);
    if (f.accumulate) fisher.drain(at.fisher, r);
  }

  // ----------------------------------------------------------------------- fisher accumulate
  template <typename F, typename G>
  static void accumulate(const AccumulateCall& call, const AccumulateEntry& e, int64_t begin,
                         int64_t end) {
    const Vf8 scale = broadcast(call.grad_scale), a = broadcast(call.alpha),
              b = broadcast(call.beta);
    F* fisher = static_cast<F*>(e.fisher) + begin;
    const G* grad = static_cast<const G*>(e.grad) + begin;
    const int64_t n = end - begin;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      store(fisher + i,
            math::accumulate_lane(call.scaled, scale, a, b, load(fisher + i), load(grad + i)));
    }
    const int64_t r = n - i;
    if (r == 0) return;
    Tail<F> f;
    Tail<G> g;
    f.fill(fisher + i, r);
    g.fill(grad + i, r);
    store(f.v, math::accumulate_lane(call.scaled, scale, a, b, load(f.v), load(g.v)));
    f.drain(fisher + i, r);
  }

  // ---------------------------------------------------------------------------- fisher score
  // Lanes 0-3 and 4-7 of a group go to the low and high float64 accumulators. Products in
  // float64: d*g and f*g are exact, (f*g)*g is rounded once, then added.
  FF_AVX2 static void score_group(Vf8 d, Vf8 g, Vf8 f, __m256d acc[4]) {
    const __m256d g_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(g.v));
    const __m256d g_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(g.v, 1));
    const __m256d d_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(d.v));
    const __m256d d_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(d.v, 1));
    const __m256d f_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f.v));
    const __m256d f_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f.v, 1));
    acc[0] = _mm256_add_pd(acc[0], _mm256_mul_pd(d_lo, g_lo));
    acc[1] = _mm256_add_pd(acc[1], _mm256_mul_pd(d_hi, g_hi));
    acc[2] = _mm256_add_pd(acc[2], _mm256_mul_pd(_mm256_mul_pd(f_lo, g_lo), g_lo));
    acc[3] = _mm256_add_pd(acc[3], _mm256_mul_pd(_mm256_mul_pd(f_hi, g_hi), g_hi));
  }

  template <typename D, typename G, typename F>
  static void score(const ScoreEntry& e, int64_t begin, int64_t end, double dot[8],
                    double weighted[8]) {
    __m256d acc[4] = {_mm256_loadu_pd(dot), _mm256_loadu_pd(dot + 4), _mm256_loadu_pd(weighted),
                      _mm256_loadu_pd(weighted + 4)};
    const D* direction = static_cast<const D*>(e.direction) + begin;
    const G* grad = static_cast<const G*>(e.grad) + begin;
    const F* fisher = static_cast<const F*>(e.fisher) + begin;
    const int64_t n = end - begin;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      score_group(load(direction + i), load(grad + i), load(fisher + i), acc);
    }
    const int64_t r = n - i;
    if (r > 0) {
      Tail<D> d;
      Tail<G> g;
      Tail<F> f;
      d.fill(direction + i, r);
      g.fill(grad + i, r);
      f.fill(fisher + i, r);
      score_group(load(d.v), load(g.v), load(f.v), acc);
    }
    _mm256_storeu_pd(dot, acc[0]);
    _mm256_storeu_pd(dot + 4, acc[1]);
    _mm256_storeu_pd(weighted, acc[2]);
    _mm256_storeu_pd(weighted + 4, acc[3]);
  }
};

#undef FF_AVX2

}  // namespace

StepSegmentFn step_segment_avx2(DType param, DType state, DType fisher) {
  return pick_step<Loops>(param, state, fisher);
}
AccumulateSegmentFn accumulate_segment_avx2(DType fisher, DType grad) {
  return pick_accumulate<Loops>(fisher, grad);
}
ScoreSegmentFn score_segment_avx2(DType direction, DType grad, DType fisher) {
  return pick_score<Loops>(direction, grad, fisher);
}

}  // namespace cpu
}  // namespace fisherforget

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif  // x86-64
