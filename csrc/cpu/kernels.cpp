// The CPU kernels' driver: per-call and per-tensor constants, the split of all elements between
// threads, the step/Fisher count increments, and the scalar inner loops (the reference loops on
// every CPU; the AVX2 ones are in kernels_avx2.cpp).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/segments.h"

namespace fisherforget {
namespace cpu {
namespace {

// ------------------------------------------------------------------------- scalar inner loops
struct ScalarLoops {
  template <typename P, typename S, typename F>
  static void step(const StepCall& call, const StepEntry& e, const TensorConsts& tc,
                   int64_t begin, int64_t end) {
    const math::StepFlags f = call.flags;
    const bool may_freeze = math::may_freeze(f, e.mask != nullptr);
    P* param = static_cast<P*>(e.param);
    const P* grad = static_cast<const P*>(e.grad);
    S* exp_avg = static_cast<S*>(e.exp_avg);
    S* exp_avg_sq = static_cast<S*>(e.exp_avg_sq);
    S* max_exp_avg_sq = static_cast<S*>(e.max_exp_avg_sq);
    F* fisher = static_cast<F*>(e.fisher);
    for (int64_t i = begin; i < end; ++i) {
      float p = static_cast<float>(param[i]), m = static_cast<float>(exp_avg[i]),
            v = static_cast<float>(exp_avg_sq[i]);
      float vmax = f.amsgrad ? static_cast<float>(max_exp_avg_sq[i]) : 0.0f;
      float fi = fisher != nullptr ? static_cast<float>(fisher[i]) : 0.0f;
      const bool may_update = e.mask == nullptr || e.mask[i];
      math::step_lane<math::MomentRounding::kFused>(f, call.k, tc.lane, may_freeze, may_update,
                                                    static_cast<float>(grad[i]), p, m, v, vmax, fi);
      param[i] = static_cast<P>(p);
      exp_avg[i] = static_cast<S>(m);
      exp_avg_sq[i] = static_cast<S>(v);
      if (f.amsgrad) max_exp_avg_sq[i] = static_cast<S>(vmax);
      if (f.accumulate) fisher[i] = fisher_to_store(fi, tc.fisher_key, i, fisher);
    }
  }

  template <typename F, typename G>
  static void accumulate(const AccumulateCall& call, const AccumulateEntry& e, int64_t begin,
                         int64_t end) {
    F* fisher = static_cast<F*>(e.fisher);
    const G* grad = static_cast<const G*>(e.grad);
    for (int64_t i = begin; i < end; ++i) {
      fisher[i] = static_cast<F>(math::accumulate_lane(call.scaled, call.grad_scale, call.alpha,
                                                       call.beta, static_cast<float>(fisher[i]),
                                                       static_cast<float>(grad[i])));
    }
  }

  // Element begin + 8j + l goes to lane l; a last partial group also adds +0.0 to its missing
  // lanes, exactly as the AVX2 loop's zero-padded tail does (so both give the same bits).
  template <typename D, typename G, typename F>
  static void score(const ScoreEntry& e, int64_t begin, int64_t end, double dot[8],
                    double weighted[8]) {
    const D* direction = static_cast<const D*>(e.direction);
    const G* grad = static_cast<const G*>(e.grad);
    const F* fisher = static_cast<const F*>(e.fisher);
    for (int64_t group = begin; group < end; group += 8) {
      for (int64_t l = 0; l < 8; ++l) {
        const int64_t i = group + l;
        const bool in = i < end;
        const double g = in ? static_cast<double>(static_cast<float>(grad[i])) : 0.0;
        const double d = in ? static_cast<double>(static_cast<float>(direction[i])) : 0.0;
        const double f = in ? static_cast<double>(static_cast<float>(fisher[i])) : 0.0;
        dot[l] += d * g;
        weighted[l] += (f * g) * g;
      }
    }
  }
};

// ---------------------------------------------------------------------- instruction set choice
enum class Isa : int { kScalar = 0, kAvx2 = 1 };

bool cpu_has_avx2() {
#if defined(FF_CPU_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

std::atomic<int>& isa_setting() {
  static std::atomic<int> setting{static_cast<int>(cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar)};
  return setting;
}

Isa current_isa() { return static_cast<Isa>(isa_setting().load(std::memory_order_relaxed)); }

StepSegmentFn step_segment(Isa isa, DType p, DType s, DType f) {
#ifdef FF_CPU_HAVE_AVX2
  if (isa == Isa::kAvx2) return step_segment_avx2(p, s, f);
#endif
  return step_segment_scalar(p, s, f);
}
AccumulateSegmentFn accumulate_segment(Isa isa, DType f, DType g) {
#ifdef FF_CPU_HAVE_AVX2
  if (isa == Isa::kAvx2) return accumulate_segment_avx2(f, g);
#endif
  return accumulate_segment_scalar(f, g);
}
ScoreSegmentFn score_segment(Isa isa, DType d, DType g, DType f) {
#ifdef FF_CPU_HAVE_AVX2
  if (isa == Isa::kAvx2) return score_segment_avx2(d, g, f);
#endif
  return score_segment_scalar(d, g, f);
}

// ------------------------------------------------------------------------------ work splitting
// Threads get contiguous ranges of all elements (the tensors in order, as one range) in units of
// kBlock elements; below kGrain elements in all, one thread does everything (a parallel region
// costs microseconds).
constexpr int64_t kBlock = 64;
constexpr int64_t kGrain = 16384;

// Calls fn(entry index, begin, end) for the pieces of the tensors that overlap [first, last) of
// the concatenated range; `offsets` are the tensors' starts in it (offsets[n] = total).
template <typename Fn>
void for_each_piece(const std::vector<int64_t>& offsets, int64_t first, int64_t last, Fn&& fn) {
  int64_t i = std::upper_bound(offsets.begin(), offsets.end(), first) - offsets.begin() - 1;
  const int64_t n = static_cast<int64_t>(offsets.size()) - 1;
  for (; i < n && offsets[i] < last; ++i) {
    const int64_t begin = std::max(first, offsets[i]) - offsets[i];
    const int64_t end = std::min(last, offsets[i + 1]) - offsets[i];
    if (begin < end) fn(i, begin, end);
  }
}

template <typename Fn>
void parallel_over_elements(const std::vector<int64_t>& offsets, Fn&& fn) {
  const int64_t total = offsets.back();
  if (total == 0) return;
  const int64_t blocks = (total + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrain / kBlock, [&](int64_t b0, int64_t b1) {
    for_each_piece(offsets, b0 * kBlock, std::min(b1 * kBlock, total), fn);
  });
}

// The lr tensor's value (CPU memory), as lr_decay takes it; 0 for a host lr.
double lr_tensor_value(const StepSettings& s) {
  switch (s.lr_kind) {
    case LrKind::kFloat32:
      return *static_cast<const float*>(s.lr_tensor);
    case LrKind::kFloat64:
      return *static_cast<const double*>(s.lr_tensor);
    case LrKind::kBFloat16:
      return static_cast<float>(*static_cast<const c10::BFloat16*>(s.lr_tensor));
    case LrKind::kFloat16:
      return static_cast<float>(*static_cast<const c10::Half*>(s.lr_tensor));
    case LrKind::kHost:
      break;
  }
  return 0.0;
}

}  // namespace

StepSegmentFn step_segment_scalar(DType param, DType state, DType fisher) {
  return pick_step<ScalarLoops>(param, state, fisher);
}
AccumulateSegmentFn accumulate_segment_scalar(DType fisher, DType grad) {
  return pick_accumulate<ScalarLoops>(fisher, grad);
}
ScoreSegmentFn score_segment_scalar(DType direction, DType grad, DType fisher) {
  return pick_score<ScalarLoops>(direction, grad, fisher);
}

const char* isa() { return current_isa() == Isa::kAvx2 ? "avx2" : "scalar"; }

bool set_isa(const char* name) {
  if (std::strcmp(name, "scalar") == 0) {
    isa_setting().store(static_cast<int>(Isa::kScalar));
    return true;
  }
  if (std::strcmp(name, "avx2") == 0 && cpu_has_avx2()) {
    isa_setting().store(static_cast<int>(Isa::kAvx2));
    return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------- fused step

void fused_step(const StepEntry* entries, int64_t n, const StepSettings& s) {
  if (n == 0) return;
  if (s.found_inf != nullptr && *s.found_inf > 0.0f) return;  // a skipped step changes nothing

  const StepCall call = step_call(s);
  const LrDecay lr = lr_decay(call, lr_tensor_value(s));
  const float grad_scale = s.grad_scale != nullptr ? *s.grad_scale : 1.0f;

  // Per tensor: constants from its counts (the bias corrections only when the step differs from
  // the previous tensor's, as it rarely does: pow is slow), the inner loop for its dtypes, its
  // start in the element range.
  struct Work {
    TensorConsts consts;
    StepSegmentFn fn;
  };
  std::vector<Work> work(static_cast<size_t>(n));
  std::vector<int64_t> offsets(static_cast<size_t>(n) + 1);
  const Isa isa = current_isa();
  BiasCorrections bias{};
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const StepEntry& e = entries[i];
    Work& w = work[static_cast<size_t>(i)];
    if (i == 0 || *e.step + 1.0f != bias.t) bias = bias_corrections(call, *e.step);
    w.consts = tensor_consts(call, lr, bias, e.fisher_count, grad_scale);
    w.fn = step_segment(isa, e.param_dtype, e.state_dtype, e.fisher_dtype);
    offsets[static_cast<size_t>(i)] = total;
    total += e.numel;
  }
  offsets[static_cast<size_t>(n)] = total;
  // Every constant above was computed from the old counts: advance them now.
  for (int64_t i = 0; i < n; ++i) {
    *entries[i].step += 1.0f;
    if (call.flags.accumulate) *entries[i].fisher_count += 1.0f;
  }

  parallel_over_elements(offsets, [&](int64_t i, int64_t begin, int64_t end) {
    const Work& w = work[static_cast<size_t>(i)];
    w.fn(call, entries[i], w.consts, begin, end);
  });
}

// --------------------------------------------------------------------------- fisher accumulate

void fisher_accumulate(const AccumulateEntry* entries, int64_t n, double alpha, double beta,
                       const float* grad_scale) {
  if (n == 0) return;
  AccumulateCall call{grad_scale != nullptr, grad_scale != nullptr ? *grad_scale : 1.0f,
                      static_cast<float>(alpha), static_cast<float>(beta)};
  std::vector<AccumulateSegmentFn> fns(static_cast<size_t>(n));
  std::vector<int64_t> offsets(static_cast<size_t>(n) + 1);
  const Isa isa = current_isa();
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    fns[static_cast<size_t>(i)] =
        accumulate_segment(isa, entries[i].fisher_dtype, entries[i].grad_dtype);
    offsets[static_cast<size_t>(i)] = total;
    total += entries[i].numel;
  }
  offsets[static_cast<size_t>(n)] = total;
  parallel_over_elements(offsets, [&](int64_t i, int64_t begin, int64_t end) {
    fns[static_cast<size_t>(i)](call, entries[i], begin, end);
  });
}

// -------------------------------------------------------------------------------- fisher score

void fisher_score(const ScoreEntry* entries, int64_t n, double* out) {
  out[0] = 0.0;
  out[1] = 0.0;
  if (n == 0) return;
  std::vector<ScoreSegmentFn> fns(static_cast<size_t>(n));
  std::vector<int64_t> offsets(static_cast<size_t>(n) + 1);
  const Isa isa = current_isa();
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    fns[static_cast<size_t>(i)] = score_segment(isa, entries[i].direction_dtype,
                                                entries[i].grad_dtype, entries[i].fisher_dtype);
    offsets[static_cast<size_t>(i)] = total;
    total += entries[i].numel;
  }
  offsets[static_cast<size_t>(n)] = total;
  if (total == 0) return;
  // Fixed chunks of the element range, each reduced on its own into 8 lanes per sum, summed in a
  // fixed tree, then the chunk sums in chunk order: the same bits for any number of threads.
  const int64_t chunks = (total + kScoreChunk - 1) / kScoreChunk;
  std::vector<double> partials(static_cast<size_t>(2 * chunks));
  at::parallel_for(0, chunks, std::max<int64_t>(1, kGrain / kScoreChunk), [&](int64_t c0,
                                                                              int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double dot[8] = {0, 0, 0, 0, 0, 0, 0, 0}, weighted[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for_each_piece(offsets, c * kScoreChunk, std::min((c + 1) * kScoreChunk, total),
                     [&](int64_t i, int64_t begin, int64_t end) {
                       fns[static_cast<size_t>(i)](entries[i], begin, end, dot, weighted);
                     });
      auto tree = [](const double* x) {
        return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
      };
      partials[static_cast<size_t>(2 * c)] = tree(dot);
      partials[static_cast<size_t>(2 * c + 1)] = tree(weighted);
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    out[0] += partials[static_cast<size_t>(2 * c)];
    out[1] += partials[static_cast<size_t>(2 * c + 1)];
  }
}

}  // namespace cpu
}  // namespace fisherforget
