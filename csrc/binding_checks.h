// The torch-facing checks shared by the CPU binding (bindings.cpp) and the CUDA binding
// (bindings_cuda.cpp): they validate every tensor of an op (device, dtype, shape, contiguity)
// with messages that name the list, the index and the problem, and gather the data pointers into
// the torch-free tables of csrc/cpu/ff_cpu.h. Messages are only formatted when a check fails:
// the success path builds no strings.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <utility>
#include <vector>

#include "cpu/ff_cpu.h"
#include "ff_kernels.h"

// The op schemas' arguments, written once: each op and its host emulation (builds for the tests)
// are defined with them; fisherforget/ops.py generates the same schema for its custom op from
// StepHyper, and tests/backends/test_cuda.py checks that they agree.
//
// fused_step's arguments after its tensor lists, in schema order, as X(kind, name). The schema,
// the argument struct (StepScalarArgs), the torch.ops signature (fused_step_unboxed) and the
// Python entry's positional parser (bindings_python.cpp) are generated from this list.
#define FF_FUSED_STEP_SCALARS(X)                                                               \
  X(Float, lr) X(OptTensor, lr_tensor) X(Float, beta1) X(Float, beta2) X(Float, eps)           \
  X(Float, weight_decay) X(Bool, amsgrad) X(Bool, maximize) X(OptStr, fisher_mode)             \
  X(Float, fisher_beta) X(Float, fisher_scale) X(OptFloat, freeze_above)                       \
  X(OptFloat, freeze_below) X(OptTensor, grad_scale) X(OptTensor, found_inf)
// Each kind's schema type, value type (in StepScalarArgs) and torch.ops parameter type.
#define FF_SCHEMA_Float "float"
#define FF_SCHEMA_Bool "bool"
#define FF_SCHEMA_OptFloat "float?"
#define FF_SCHEMA_OptStr "str?"
#define FF_SCHEMA_OptTensor "Tensor?"
#define FF_VALUE_Float double
#define FF_VALUE_Bool bool
#define FF_VALUE_OptFloat std::optional<double>
#define FF_VALUE_OptStr std::optional<c10::string_view>
#define FF_VALUE_OptTensor std::optional<at::Tensor>
#define FF_PARAM_Float double
#define FF_PARAM_Bool bool
#define FF_PARAM_OptFloat std::optional<double>
#define FF_PARAM_OptStr std::optional<c10::string_view>
#define FF_PARAM_OptTensor const std::optional<at::Tensor>&

#define FF_SCHEMA_ARG(kind, name) ", " FF_SCHEMA_##kind " " #name
#define FF_FUSED_STEP_SCHEMA                                                                     \
  "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "      \
  "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] fishers, Tensor?[] masks, Tensor(f!)[] steps, "    \
  "Tensor(g!)[] fisher_counts, *" FF_FUSED_STEP_SCALARS(FF_SCHEMA_ARG) ") -> ()"
#define FF_FISHER_ACCUMULATE_SCHEMA \
  "(Tensor(a!)[] fishers, Tensor[] grads, *, float alpha, float beta, Tensor? grad_scale) -> ()"
#define FF_FISHER_SCORE_SCHEMA "(Tensor[] directions, Tensor[] grads, Tensor[] fishers) -> Tensor"

namespace fisherforget {
namespace binding {

// fused_step's tensor lists (before the scalars) and all its arguments.
constexpr int kFusedStepLists = 9;
#define FF_COUNT_ARG(kind, name) +1
constexpr int kFusedStepArgs = kFusedStepLists FF_FUSED_STEP_SCALARS(FF_COUNT_ARG);
#undef FF_COUNT_ARG

// "params[3]" or "grad_scale", printed only into an error message.
struct Name {
  const char* list;
  int64_t index;  // < 0: a single argument, not a list item
};
inline std::ostream& operator<<(std::ostream& out, const Name& name) {
  out << name.list;
  if (name.index >= 0) out << '[' << name.index << ']';
  return out;
}
inline Name item(const char* list, size_t index) { return Name{list, static_cast<int64_t>(index)}; }
inline Name arg(const char* name) { return Name{name, -1}; }

// Which kernels a call runs: native CPU, CUDA, or the host emulation of the CUDA kernels.
enum class Target { kCpu, kCuda, kEmulation };

struct Checker {
  const char* op;
  Target target;
  at::Device device = at::Device(at::kCPU);
  // Whether a non-contiguous tensor is accepted: the kernels then work on a contiguous copy,
  // written back by finish() where the op writes it. Otherwise contiguity is required (the CUDA
  // glue stages in Python).
  bool stage_noncontiguous = false;
  std::vector<at::Tensor> copies;                            // kept alive during the kernels
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (original, copy)

  // The data of a checked tensor, or of its contiguous copy.
  C10_ALWAYS_INLINE void* data(const at::Tensor& t, bool written) {
    if (C10_LIKELY(t.is_contiguous())) {
      // const_data_ptr skips the copy-on-write bookkeeping of a mutable access where the op
      // only reads.
      return written ? t.data_ptr() : const_cast<void*>(t.const_data_ptr());
    }
    return staged_data(t, written);
  }
  C10_NOINLINE void* staged_data(const at::Tensor& t, bool written) {
    at::Tensor copy = t.contiguous();
    if (written) write_back.emplace_back(t, copy);
    copies.push_back(copy);
    return copy.data_ptr();
  }

  // After the kernels: the results computed in copies go to their original tensors.
  void finish() {
    for (auto& [original, copy] : write_back) original.copy_(copy);
  }

  bool on_cuda() const { return target == Target::kCuda; }

  void set_device(const at::Tensor& first, Name name) {
    TORCH_CHECK(first.defined(), op, ": ", name, " is an undefined tensor");
    device = first.device();
    TORCH_CHECK(device.is_cuda() == on_cuda(), op, ": ", name, " is on ", device, "; the ",
                target == Target::kCuda ? "CUDA"
                                        : (target == Target::kCpu ? "CPU" : "CPU (host emulation)"),
                " kernel needs ", on_cuda() ? "CUDA" : "CPU", " tensors");
  }

  // Each check is a cheap test inlined on the success path (it runs for every tensor of a call:
  // thousands), and an out-of-line failure path that raises naming the tensor and the problem.
  C10_ALWAYS_INLINE void tensor(const at::Tensor& t, Name name, bool contiguous = true) const {
    if (C10_LIKELY(t.defined() && t.layout() == at::kStrided && t.device() == device &&
                   (!contiguous || stage_noncontiguous || t.is_contiguous()))) {
      return;
    }
    tensor_failed(t, name, contiguous);
  }
  C10_NOINLINE void tensor_failed(const at::Tensor& t, Name name, bool contiguous) const {
    TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor");
    TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(),
                " but the tensors must all be on ", device);
    TORCH_CHECK(!contiguous || stage_noncontiguous || t.is_contiguous(), op, ": ", name,
                " must be contiguous (the Python backend passes contiguous copies)");
  }

  C10_ALWAYS_INLINE void same_shape(const at::Tensor& t, Name name, const at::Tensor& like,
                                    Name like_name) const {
    if (C10_UNLIKELY(!t.sizes().equals(like.sizes()))) {
      shape_failed(t, name, like, like_name);
    }
  }
  C10_NOINLINE void shape_failed(const at::Tensor& t, Name name, const at::Tensor& like,
                                 Name like_name) const {
    TORCH_CHECK(false, op, ": ", name, " has shape ", t.sizes(), " but ", like_name,
                " has shape ", like.sizes());
  }

  C10_ALWAYS_INLINE DType dtype(const at::Tensor& t, Name name, bool allow_half) const {
    switch (t.scalar_type()) {
      case at::kFloat:
        return DType::kFloat32;
      case at::kBFloat16:
        return DType::kBFloat16;
      case at::kHalf:
        if (allow_half) return DType::kFloat16;
        break;
      default:
        break;
    }
    dtype_failed(t, name, allow_half);
  }
  [[noreturn]] C10_NOINLINE void dtype_failed(const at::Tensor& t, Name name,
                                              bool allow_half) const {
    TORCH_CHECK_TYPE(false, op, ": ", name, " has dtype ", t.scalar_type(),
                     "; supported: float32, bfloat16", allow_half ? ", float16" : "",
                     " (use backend='reference' for others)");
    throw std::logic_error("unreachable");  // TORCH_CHECK_TYPE(false) throws
  }

  C10_ALWAYS_INLINE void same_dtype(const at::Tensor& t, Name name, const at::Tensor& like,
                                    Name like_name) const {
    if (C10_UNLIKELY(t.scalar_type() != like.scalar_type())) {
      dtype_mismatch(t, name, like, like_name);
    }
  }
  C10_NOINLINE void dtype_mismatch(const at::Tensor& t, Name name, const at::Tensor& like,
                                   Name like_name) const {
    TORCH_CHECK_TYPE(false, op, ": ", name, " has dtype ", t.scalar_type(), " but ", like_name,
                     " has ", like.scalar_type());
  }

  // A one-element float32 tensor on the device, e.g. a step count or found_inf.
  C10_ALWAYS_INLINE void scalar_f32(const at::Tensor& t, Name name) const {
    tensor(t, name, false);
    if (C10_LIKELY(t.numel() == 1 && t.scalar_type() == at::kFloat)) return;
    scalar_failed(t, name);
  }
  C10_NOINLINE void scalar_failed(const at::Tensor& t, Name name) const {
    TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold one element, got shape ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                     t.scalar_type());
  }

  void list_length(size_t length, size_t expected, const char* name, const char* why) const {
    TORCH_CHECK(length == expected, op, ": ", name, " has ", length, " tensors, expected ",
                expected, " (", why, ")");
  }
};

inline FisherMode parse_fisher_mode(const char* op, std::optional<c10::string_view> mode) {
  if (!mode.has_value()) return FisherMode::kNone;
  if (*mode == "ema") return FisherMode::kEma;
  if (*mode == "mean") return FisherMode::kMean;
  if (*mode == "sum") return FisherMode::kSum;
  TORCH_CHECK(false, op, ": fisher_mode must be 'ema', 'mean', 'sum' or None, got '", *mode, "'");
}

// ---------------------------------------------------------------------------------- list views
// The checks read tensor lists through views, so that the Python entry points (bindings_python.cpp)
// check the tensors inside Python lists without copying them into at::Tensor lists (a copy of a
// tensor referenced only by its Python object costs a reference-count round trip through the
// Python object). A tensor list view has size() and operator[] -> const at::Tensor& (at::TensorList
// is one); a mask list view has size() and at(i) -> const at::Tensor*, null for None.
struct OptionalTensorsView {
  const std::vector<std::optional<at::Tensor>>& values;
  size_t size() const { return values.size(); }
  const at::Tensor* at(size_t i) const {
    const std::optional<at::Tensor>& v = values[i];
    return v.has_value() && v->defined() ? &*v : nullptr;
  }
};

// ------------------------------------------------------------------------------------ fused_step

// fused_step's scalar arguments (FF_FUSED_STEP_SCALARS).
struct StepScalarArgs {
#define FF_FIELD(kind, name) FF_VALUE_##kind name{};
  FF_FUSED_STEP_SCALARS(FF_FIELD)
#undef FF_FIELD
};

// The arguments of fused_step, in the order of its schema, for any tensor-list view (the
// at::TensorList of a torch.ops call, or the Python lists of bindings_python.cpp).
template <typename Tensors, typename Masks>
struct StepArgs {
  const Tensors& params;
  const Tensors& grads;
  const Tensors& exp_avgs;
  const Tensors& exp_avg_sqs;
  const Tensors& max_exp_avg_sqs;
  const Tensors& fishers;
  const Masks& masks;
  const Tensors& steps;
  const Tensors& fisher_counts;
  StepScalarArgs scalars;
};

// Checks every argument of fused_step and returns the table and the settings; throws (changing
// nothing) on the first problem. `settings.found_inf` etc. point into the argument tensors.
template <typename Tensors, typename Masks>
std::vector<cpu::StepEntry> check_fused_step(Checker& check, const StepArgs<Tensors, Masks>& a,
                                             StepSettings& settings) {
  const StepScalarArgs& h = a.scalars;
  const size_t n = a.params.size();
  check.list_length(a.grads.size(), n, "grads", "one per param");
  check.list_length(a.exp_avgs.size(), n, "exp_avgs", "one per param");
  check.list_length(a.exp_avg_sqs.size(), n, "exp_avg_sqs", "one per param");
  check.list_length(a.masks.size(), n, "masks", "one per param, None for no mask");
  check.list_length(a.steps.size(), n, "steps", "one per param");
  if (h.amsgrad) check.list_length(a.max_exp_avg_sqs.size(), n, "max_exp_avg_sqs", "amsgrad=True");
  const bool has_fisher = !a.fishers.empty();
  if (has_fisher) check.list_length(a.fishers.size(), n, "fishers", "one per param, or none");
  const FisherMode mode = parse_fisher_mode(check.op, h.fisher_mode);
  const bool accumulates = has_fisher && mode != FisherMode::kNone;
  if (accumulates) {
    check.list_length(a.fisher_counts.size(), n, "fisher_counts", "the Fisher accumulates");
  }
  TORCH_CHECK(has_fisher || !h.freeze_above.has_value(), check.op,
              ": freeze_above needs the fishers list");
  TORCH_CHECK(has_fisher || !h.freeze_below.has_value(), check.op,
              ": freeze_below needs the fishers list");

  settings.lr = h.lr;
  settings.beta1 = h.beta1;
  settings.beta2 = h.beta2;
  settings.eps = h.eps;
  settings.weight_decay = h.weight_decay;
  settings.amsgrad = h.amsgrad;
  settings.maximize = h.maximize;
  settings.has_fisher = has_fisher;
  settings.fisher_mode = mode;
  settings.fisher_beta = h.fisher_beta;
  settings.fisher_scale = h.fisher_scale;
  settings.has_freeze_above = h.freeze_above.has_value();
  settings.freeze_above = h.freeze_above.value_or(0.0);
  settings.has_freeze_below = h.freeze_below.has_value();
  settings.freeze_below = h.freeze_below.value_or(0.0);
  std::vector<cpu::StepEntry> table;
  if (n == 0) return table;

  check.set_device(a.params[0], item("params", 0));
  table.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    const Name p_name = item("params", i);
    cpu::StepEntry& e = table[i];
    check.tensor(p, p_name);
    e.param_dtype = check.dtype(p, p_name, true);
    const Name g_name = item("grads", i);
    check.tensor(a.grads[i], g_name);
    check.same_shape(a.grads[i], g_name, p, p_name);
    check.same_dtype(a.grads[i], g_name, p, p_name);
    const Name m_name = item("exp_avgs", i);
    check.tensor(a.exp_avgs[i], m_name);
    check.same_shape(a.exp_avgs[i], m_name, p, p_name);
    e.state_dtype = check.dtype(a.exp_avgs[i], m_name, false);
    auto same_state = [&](const at::Tensor& t, Name name) {
      check.tensor(t, name);
      check.same_shape(t, name, p, p_name);
      check.same_dtype(t, name, a.exp_avgs[i], m_name);
    };
    same_state(a.exp_avg_sqs[i], item("exp_avg_sqs", i));
    e.max_exp_avg_sq = nullptr;
    if (h.amsgrad) {
      same_state(a.max_exp_avg_sqs[i], item("max_exp_avg_sqs", i));
      e.max_exp_avg_sq = check.data(a.max_exp_avg_sqs[i], true);
    }
    e.fisher = nullptr;
    e.fisher_dtype = DType::kFloat32;
    if (has_fisher) {
      const Name f_name = item("fishers", i);
      check.tensor(a.fishers[i], f_name);
      check.same_shape(a.fishers[i], f_name, p, p_name);
      e.fisher_dtype = check.dtype(a.fishers[i], f_name, false);
      e.fisher = check.data(a.fishers[i], accumulates);
    }
    e.fisher_count = nullptr;
    if (accumulates) {
      check.scalar_f32(a.fisher_counts[i], item("fisher_counts", i));
      e.fisher_count = static_cast<float*>(a.fisher_counts[i].data_ptr());
    }
    e.mask = nullptr;
    if (const at::Tensor* mask = a.masks.at(i)) {
      const Name k_name = item("masks", i);
      check.tensor(*mask, k_name);
      check.same_shape(*mask, k_name, p, p_name);
      TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, check.op, ": ", k_name,
                       " must be a bool tensor, got ", mask->scalar_type());
      e.mask = static_cast<const bool*>(check.data(*mask, false));
    }
    check.scalar_f32(a.steps[i], item("steps", i));
    e.step = static_cast<float*>(a.steps[i].data_ptr());
    e.numel = p.numel();
    e.param = check.data(p, true);
    e.grad = check.data(a.grads[i], false);
    e.exp_avg = check.data(a.exp_avgs[i], true);
    e.exp_avg_sq = check.data(a.exp_avg_sqs[i], true);
  }

  if (h.lr_tensor.has_value() && h.lr_tensor->defined()) {
    check.tensor(*h.lr_tensor, arg("lr_tensor"), false);
    TORCH_CHECK(h.lr_tensor->numel() == 1, check.op, ": lr_tensor must hold one element, got shape ",
                h.lr_tensor->sizes());
    switch (h.lr_tensor->scalar_type()) {
      case at::kFloat:
        settings.lr_kind = LrKind::kFloat32;
        break;
      case at::kDouble:
        settings.lr_kind = LrKind::kFloat64;
        break;
      case at::kBFloat16:
        settings.lr_kind = LrKind::kBFloat16;
        break;
      case at::kHalf:
        settings.lr_kind = LrKind::kFloat16;
        break;
      default:
        TORCH_CHECK_TYPE(false, check.op, ": lr_tensor must be a floating-point tensor, got ",
                         h.lr_tensor->scalar_type());
    }
    settings.lr_tensor = h.lr_tensor->data_ptr();
  }
  if (h.grad_scale.has_value() && h.grad_scale->defined()) {
    check.scalar_f32(*h.grad_scale, arg("grad_scale"));
    settings.grad_scale = h.grad_scale->template data_ptr<float>();
  }
  if (h.found_inf.has_value() && h.found_inf->defined()) {
    check.scalar_f32(*h.found_inf, arg("found_inf"));
    settings.found_inf = h.found_inf->template data_ptr<float>();
  }
  return table;
}

// ----------------------------------------------------------------------------- fisher_accumulate

template <typename Tensors>
std::vector<cpu::AccumulateEntry> check_fisher_accumulate(
    Checker& check, const Tensors& fishers, const Tensors& grads,
    const std::optional<at::Tensor>& grad_scale, const float** scale) {
  const size_t n = fishers.size();
  check.list_length(grads.size(), n, "grads", "one per fisher");
  *scale = nullptr;
  std::vector<cpu::AccumulateEntry> table;
  if (n == 0) return table;
  check.set_device(fishers[0], item("fishers", 0));
  table.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const Name f_name = item("fishers", i), g_name = item("grads", i);
    check.tensor(fishers[i], f_name);
    check.tensor(grads[i], g_name);
    check.same_shape(grads[i], g_name, fishers[i], f_name);
    cpu::AccumulateEntry& e = table[i];
    e.fisher_dtype = check.dtype(fishers[i], f_name, false);
    e.grad_dtype = check.dtype(grads[i], g_name, true);
    e.fisher = check.data(fishers[i], true);
    e.grad = check.data(grads[i], false);
    e.numel = fishers[i].numel();
  }
  if (grad_scale.has_value() && grad_scale->defined()) {
    check.scalar_f32(*grad_scale, arg("grad_scale"));
    *scale = grad_scale->data_ptr<float>();
  }
  return table;
}

// ---------------------------------------------------------------------------------- fisher_score

template <typename Tensors>
std::vector<cpu::ScoreEntry> check_fisher_score(Checker& check, const Tensors& directions,
                                                const Tensors& grads, const Tensors& fishers) {
  const size_t n = grads.size();
  check.list_length(directions.size(), n, "directions", "one per grad");
  check.list_length(fishers.size(), n, "fishers", "one per grad");
  std::vector<cpu::ScoreEntry> table;
  if (n == 0) return table;
  check.set_device(grads[0], item("grads", 0));
  table.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const Name d_name = item("directions", i), g_name = item("grads", i),
               f_name = item("fishers", i);
    check.tensor(directions[i], d_name);
    check.tensor(grads[i], g_name);
    check.tensor(fishers[i], f_name);
    check.same_shape(directions[i], d_name, grads[i], g_name);
    check.same_shape(fishers[i], f_name, grads[i], g_name);
    cpu::ScoreEntry& e = table[i];
    e.direction_dtype = check.dtype(directions[i], d_name, true);
    e.grad_dtype = check.dtype(grads[i], g_name, true);
    e.fisher_dtype = check.dtype(fishers[i], f_name, false);
    e.direction = check.data(directions[i], false);
    e.grad = check.data(grads[i], false);
    e.fisher = check.data(fishers[i], false);
    e.numel = grads[i].numel();
  }
  return table;
}

// The torch.ops signature of fused_step (its schema), forwarding to Run: one function per
// dispatch key is an instantiation of this template.
using TorchStepArgs = StepArgs<at::TensorList, OptionalTensorsView>;

#define FF_PARAM(kind, name) , FF_PARAM_##kind name
template <void (*Run)(const TorchStepArgs&)>
void fused_step_unboxed(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                        at::TensorList fishers, const c10::List<std::optional<at::Tensor>>& masks,
                        at::TensorList steps,
                        at::TensorList fisher_counts FF_FUSED_STEP_SCALARS(FF_PARAM)) {
#undef FF_PARAM
  const std::vector<std::optional<at::Tensor>> mask_values = masks.vec();
  const OptionalTensorsView mask_view{mask_values};
  StepScalarArgs scalars;
#define FF_ASSIGN(kind, name) scalars.name = name;
  FF_FUSED_STEP_SCALARS(FF_ASSIGN)
#undef FF_ASSIGN
  Run(TorchStepArgs{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, mask_view,
                    steps, fisher_counts, scalars});
}

// ------------------------------------------------------------------------------ CPU op bodies
// The CPU ops, shared by their two entry points (the torch.ops impls in bindings.cpp and the Python
// functions in bindings_python.cpp): check everything, run the kernel over the whole table, write
// back staged copies. The arguments are those of the matching check_* function, minus the checker.

template <typename Tensors, typename Masks>
void fused_step_on_cpu(const StepArgs<Tensors, Masks>& args) {
  Checker check{"fisherforget_C::fused_step", Target::kCpu};
  check.stage_noncontiguous = true;
  StepSettings settings;
  const std::vector<cpu::StepEntry> table = check_fused_step(check, args, settings);
  cpu::fused_step(table.data(), static_cast<int64_t>(table.size()), settings);
  check.finish();
}

template <typename Tensors>
void fisher_accumulate_on_cpu(const Tensors& fishers, const Tensors& grads, double alpha,
                              double beta, const std::optional<at::Tensor>& grad_scale) {
  Checker check{"fisherforget_C::fisher_accumulate", Target::kCpu};
  check.stage_noncontiguous = true;
  const float* scale = nullptr;
  const std::vector<cpu::AccumulateEntry> table =
      check_fisher_accumulate(check, fishers, grads, grad_scale, &scale);
  cpu::fisher_accumulate(table.data(), static_cast<int64_t>(table.size()), alpha, beta, scale);
  check.finish();
}

template <typename Tensors>
at::Tensor fisher_score_on_cpu(const Tensors& directions, const Tensors& grads,
                               const Tensors& fishers) {
  Checker check{"fisherforget_C::fisher_score", Target::kCpu};
  check.stage_noncontiguous = true;
  const std::vector<cpu::ScoreEntry> table =
      check_fisher_score(check, directions, grads, fishers);
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kDouble));
  cpu::fisher_score(table.data(), static_cast<int64_t>(table.size()), out.data_ptr<double>());
  return out;
}

}  // namespace binding
}  // namespace fisherforget
