// The torch-facing side of the fisherforget kernels: registers torch.ops.fisherforget_C.*, checks
// the tensors (device, dtype, shape, contiguity) with messages that name the list, the index and
// the problem, groups them by dtype and hands plain pointers to the torch-free kernels (ff_kernels.h).
//
// CUDA tensors run the kernels on the current stream. CPU tensors run the same kernel code on the
// host, one simulated thread at a time: an emulation for testing without a GPU, not a CPU backend.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "ff_kernels.h"

namespace {

namespace ff = fisherforget;

std::optional<ff::DType> kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return ff::DType::kFloat32;
    case at::kBFloat16:
      return ff::DType::kBFloat16;
    case at::kHalf:
      return ff::DType::kFloat16;
    default:
      return std::nullopt;
  }
}

std::string item_name(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

// Checks shared by every op: one device, of the kind this kernel serves; dense and contiguous.
struct Checker {
  const char* op;
  bool on_cuda;
  at::Device device = at::Device(at::kCPU);

  void set_device(const at::Tensor& first, const std::string& name) {
    device = first.device();
    const bool is_cuda = device.is_cuda();
    TORCH_CHECK(is_cuda == on_cuda, op, ": ", name, " is on ", device, "; the ",
                on_cuda ? "CUDA" : "CPU (host emulation)", " kernel needs ",
                on_cuda ? "CUDA" : "CPU", " tensors");
  }

  void tensor(const at::Tensor& t, const std::string& name, bool contiguous = true) const {
    TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor");
    TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(),
                " but the tensors must all be on ", device);
    TORCH_CHECK(!contiguous || t.is_contiguous(), op, ": ", name,
                " must be contiguous (the Python backend passes contiguous copies)");
  }

  void same_shape(const at::Tensor& t, const std::string& name, const at::Tensor& like,
                  const std::string& like_name) const {
    TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ",
                like_name, " has shape ", like.sizes());
  }

  ff::DType dtype(const at::Tensor& t, const std::string& name, bool allow_half) const {
    const auto kind = kernel_dtype(t.scalar_type());
    TORCH_CHECK(kind.has_value() && (allow_half || *kind != ff::DType::kFloat16), op, ": ", name,
                " has dtype ", t.scalar_type(), "; supported: float32, bfloat16",
                allow_half ? ", float16" : "", " (use backend='reference' for others)");
    return *kind;
  }

  // A 0-dim (one-element) float32 tensor on the device, e.g. a step count or found_inf.
  void scalar_f32(const at::Tensor& t, const std::string& name) const {
    tensor(t, name, false);
    TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold one element, got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                t.scalar_type());
  }

  void list_length(size_t length, size_t expected, const char* name, const char* why) const {
    TORCH_CHECK(length == expected, op, ": ", name, " has ", length, " tensors, expected ",
                expected, " (", why, ")");
  }
};

ff::ExecTarget exec_target(const Checker& check) {
  ff::ExecTarget target;
  target.emulate_on_host = !check.on_cuda;
  if (check.on_cuda) {
    target.stream = c10::cuda::getCurrentCUDAStream(check.device.index()).stream();
  }
  return target;
}

// Translates a kernel-side exception into a torch error naming the op.
template <typename Fn>
void run_kernels(const char* op, Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
}

// Indices grouped by a dtype key, groups in order of first appearance (deterministic).
template <typename Key>
std::vector<std::vector<size_t>> group_by(const std::vector<Key>& keys) {
  std::vector<std::vector<size_t>> groups;
  std::vector<Key> group_keys;
  for (size_t i = 0; i < keys.size(); ++i) {
    size_t g = 0;
    while (g < group_keys.size() && !(group_keys[g] == keys[i])) ++g;
    if (g == group_keys.size()) {
      group_keys.push_back(keys[i]);
      groups.emplace_back();
    }
    groups[g].push_back(i);
  }
  return groups;
}

// ------------------------------------------------------------------------------------ fused_step

ff::FisherMode parse_fisher_mode(const char* op, std::optional<c10::string_view> mode) {
  if (!mode.has_value()) return ff::FisherMode::kNone;
  const std::string name(mode->data(), mode->size());
  if (name == "ema") return ff::FisherMode::kEma;
  if (name == "mean") return ff::FisherMode::kMean;
  if (name == "sum") return ff::FisherMode::kSum;
  TORCH_CHECK(false, op, ": fisher_mode must be 'ema', 'mean', 'sum' or None, got '", name, "'");
}

void fused_step_impl(bool on_cuda, at::TensorList params, at::TensorList grads,
                     at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList fishers,
                     const c10::List<std::optional<at::Tensor>>& masks, at::TensorList steps,
                     at::TensorList fisher_counts, double lr,
                     const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                     double eps, double weight_decay, bool amsgrad, bool maximize,
                     std::optional<c10::string_view> fisher_mode, double fisher_beta,
                     double fisher_scale, std::optional<double> freeze_above,
                     std::optional<double> freeze_below,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  Checker check{"fisherforget_C::fused_step", on_cuda};
  const size_t n = params.size();
  check.list_length(grads.size(), n, "grads", "one per param");
  check.list_length(exp_avgs.size(), n, "exp_avgs", "one per param");
  check.list_length(exp_avg_sqs.size(), n, "exp_avg_sqs", "one per param");
  check.list_length(masks.size(), n, "masks", "one per param, None for no mask");
  check.list_length(steps.size(), n, "steps", "one per param");
  if (amsgrad) check.list_length(max_exp_avg_sqs.size(), n, "max_exp_avg_sqs", "amsgrad=True");
  const bool has_fisher = !fishers.empty();
  if (has_fisher) check.list_length(fishers.size(), n, "fishers", "one per param, or none");
  const ff::FisherMode mode = parse_fisher_mode(check.op, fisher_mode);
  const bool accumulates = has_fisher && mode != ff::FisherMode::kNone;
  if (accumulates) {
    check.list_length(fisher_counts.size(), n, "fisher_counts", "the Fisher accumulates");
  }
  TORCH_CHECK(has_fisher || !freeze_above.has_value(), check.op,
              ": freeze_above needs the fishers list");
  TORCH_CHECK(has_fisher || !freeze_below.has_value(), check.op,
              ": freeze_below needs the fishers list");
  if (n == 0) return;

  check.set_device(params[0], "params[0]");
  std::vector<std::tuple<ff::DType, ff::DType, ff::DType>> keys(n);
  std::vector<int64_t> numels(n);
  std::vector<void*> param_ptrs(n), exp_avg_ptrs(n), exp_avg_sq_ptrs(n), max_ptrs(n, nullptr),
      fisher_ptrs(n, nullptr);
  std::vector<const void*> grad_ptrs(n);
  std::vector<const bool*> mask_ptrs(n, nullptr);
  std::vector<float*> step_ptrs(n), count_ptrs(n, nullptr);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::string p_name = item_name("params", i);
    check.tensor(p, p_name);
    const ff::DType p_dtype = check.dtype(p, p_name, true);
    const std::string g_name = item_name("grads", i);
    check.tensor(grads[i], g_name);
    check.same_shape(grads[i], g_name, p, p_name);
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), check.op, ": ", g_name, " has dtype ",
                grads[i].scalar_type(), " but ", p_name, " has ", p.scalar_type());
    const std::string m_name = item_name("exp_avgs", i);
    check.tensor(exp_avgs[i], m_name);
    check.same_shape(exp_avgs[i], m_name, p, p_name);
    const ff::DType s_dtype = check.dtype(exp_avgs[i], m_name, false);
    auto same_state_dtype = [&](const at::Tensor& t, const std::string& name) {
      check.tensor(t, name);
      check.same_shape(t, name, p, p_name);
      TORCH_CHECK(t.scalar_type() == exp_avgs[i].scalar_type(), check.op, ": ", name,
                  " has dtype ", t.scalar_type(), " but ", m_name, " has ",
                  exp_avgs[i].scalar_type());
    };
    same_state_dtype(exp_avg_sqs[i], item_name("exp_avg_sqs", i));
    if (amsgrad) {
      same_state_dtype(max_exp_avg_sqs[i], item_name("max_exp_avg_sqs", i));
      max_ptrs[i] = max_exp_avg_sqs[i].data_ptr();
    }
    ff::DType f_dtype = ff::DType::kFloat32;
    if (has_fisher) {
      const std::string f_name = item_name("fishers", i);
      check.tensor(fishers[i], f_name);
      check.same_shape(fishers[i], f_name, p, p_name);
      f_dtype = check.dtype(fishers[i], f_name, false);
      fisher_ptrs[i] = fishers[i].data_ptr();
    }
    if (accumulates) {
      check.scalar_f32(fisher_counts[i], item_name("fisher_counts", i));
      count_ptrs[i] = fisher_counts[i].data_ptr<float>();
    }
    const std::optional<at::Tensor> mask = masks.get(i);
    if (mask.has_value() && mask->defined()) {
      const std::string k_name = item_name("masks", i);
      check.tensor(*mask, k_name);
      check.same_shape(*mask, k_name, p, p_name);
      TORCH_CHECK(mask->scalar_type() == at::kBool, check.op, ": ", k_name,
                  " must be a bool tensor, got ", mask->scalar_type());
      mask_ptrs[i] = mask->data_ptr<bool>();
    }
    check.scalar_f32(steps[i], item_name("steps", i));
    keys[i] = std::make_tuple(p_dtype, s_dtype, f_dtype);
    numels[i] = p.numel();
    param_ptrs[i] = p.data_ptr();
    grad_ptrs[i] = grads[i].data_ptr();
    exp_avg_ptrs[i] = exp_avgs[i].data_ptr();
    exp_avg_sq_ptrs[i] = exp_avg_sqs[i].data_ptr();
    step_ptrs[i] = steps[i].data_ptr<float>();
  }

  ff::FusedStepProblem base;
  base.lr = lr;
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    check.tensor(*lr_tensor, "lr_tensor", false);
    TORCH_CHECK(lr_tensor->numel() == 1, check.op, ": lr_tensor must hold one element, got shape ",
                lr_tensor->sizes());
    switch (lr_tensor->scalar_type()) {
      case at::kFloat:
        base.lr_kind = ff::LrKind::kFloat32;
        break;
      case at::kDouble:
        base.lr_kind = ff::LrKind::kFloat64;
        break;
      case at::kBFloat16:
        base.lr_kind = ff::LrKind::kBFloat16;
        break;
      case at::kHalf:
        base.lr_kind = ff::LrKind::kFloat16;
        break;
      default:
        TORCH_CHECK(false, check.op, ": lr_tensor must be a floating-point tensor, got ",
                    lr_tensor->scalar_type());
    }
    base.lr_tensor = lr_tensor->data_ptr();
  }
  if (grad_scale.has_value() && grad_scale->defined()) {
    check.scalar_f32(*grad_scale, "grad_scale");
    base.grad_scale = grad_scale->data_ptr<float>();
  }
  if (found_inf.has_value() && found_inf->defined()) {
    check.scalar_f32(*found_inf, "found_inf");
    base.found_inf = found_inf->data_ptr<float>();
  }
  base.beta1 = beta1;
  base.beta2 = beta2;
  base.eps = eps;
  base.weight_decay = weight_decay;
  base.amsgrad = amsgrad;
  base.maximize = maximize;
  base.fisher_mode = mode;
  base.fisher_beta = fisher_beta;
  base.fisher_scale = fisher_scale;
  base.has_freeze_above = freeze_above.has_value();
  base.freeze_above = freeze_above.value_or(0.0);
  base.has_freeze_below = freeze_below.has_value();
  base.freeze_below = freeze_below.value_or(0.0);

  std::optional<c10::cuda::CUDAGuard> guard;
  if (on_cuda) guard.emplace(check.device);
  const ff::ExecTarget target = exec_target(check);
  for (const std::vector<size_t>& group : group_by(keys)) {
    // Gather this dtype group's pointers into contiguous arrays.
    const size_t m = group.size();
    std::vector<int64_t> g_numels(m);
    std::vector<void*> g_params(m), g_exp_avgs(m), g_exp_avg_sqs(m), g_max(m), g_fishers(m);
    std::vector<const void*> g_grads(m);
    std::vector<const bool*> g_masks(m);
    std::vector<float*> g_steps(m), g_counts(m);
    for (size_t j = 0; j < m; ++j) {
      const size_t i = group[j];
      g_numels[j] = numels[i];
      g_params[j] = param_ptrs[i];
      g_grads[j] = grad_ptrs[i];
      g_exp_avgs[j] = exp_avg_ptrs[i];
      g_exp_avg_sqs[j] = exp_avg_sq_ptrs[i];
      g_max[j] = max_ptrs[i];
      g_fishers[j] = fisher_ptrs[i];
      g_masks[j] = mask_ptrs[i];
      g_steps[j] = step_ptrs[i];
      g_counts[j] = count_ptrs[i];
    }
    ff::FusedStepProblem problem = base;
    problem.num_tensors = static_cast<int64_t>(m);
    problem.numels = g_numels.data();
    std::tie(problem.param_dtype, problem.state_dtype, problem.fisher_dtype) = keys[group[0]];
    problem.params = g_params.data();
    problem.grads = g_grads.data();
    problem.exp_avgs = g_exp_avgs.data();
    problem.exp_avg_sqs = g_exp_avg_sqs.data();
    problem.max_exp_avg_sqs = amsgrad ? g_max.data() : nullptr;
    problem.fishers = has_fisher ? g_fishers.data() : nullptr;
    problem.masks = g_masks.data();
    problem.steps = g_steps.data();
    problem.fisher_counts = accumulates ? g_counts.data() : nullptr;
    run_kernels(check.op, [&] { ff::fused_step(problem, target); });
  }
}

// ----------------------------------------------------------------------------- fisher_accumulate

void fisher_accumulate_impl(bool on_cuda, at::TensorList fishers, at::TensorList grads,
                            double alpha, double beta,
                            const std::optional<at::Tensor>& grad_scale) {
  Checker check{"fisherforget_C::fisher_accumulate", on_cuda};
  const size_t n = fishers.size();
  check.list_length(grads.size(), n, "grads", "one per fisher");
  if (n == 0) return;
  check.set_device(fishers[0], "fishers[0]");
  std::vector<std::pair<ff::DType, ff::DType>> keys(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string f_name = item_name("fishers", i), g_name = item_name("grads", i);
    check.tensor(fishers[i], f_name);
    check.tensor(grads[i], g_name);
    check.same_shape(grads[i], g_name, fishers[i], f_name);
    keys[i] = {check.dtype(fishers[i], f_name, false), check.dtype(grads[i], g_name, true)};
  }
  const float* scale = nullptr;
  if (grad_scale.has_value() && grad_scale->defined()) {
    check.scalar_f32(*grad_scale, "grad_scale");
    scale = grad_scale->data_ptr<float>();
  }
  std::optional<c10::cuda::CUDAGuard> guard;
  if (on_cuda) guard.emplace(check.device);
  const ff::ExecTarget target = exec_target(check);
  for (const std::vector<size_t>& group : group_by(keys)) {
    std::vector<int64_t> numels;
    std::vector<void*> fisher_ptrs;
    std::vector<const void*> grad_ptrs;
    for (size_t i : group) {
      numels.push_back(fishers[i].numel());
      fisher_ptrs.push_back(fishers[i].data_ptr());
      grad_ptrs.push_back(grads[i].data_ptr());
    }
    ff::FisherAccumulateProblem problem;
    problem.num_tensors = static_cast<int64_t>(group.size());
    problem.numels = numels.data();
    std::tie(problem.fisher_dtype, problem.grad_dtype) = keys[group[0]];
    problem.fishers = fisher_ptrs.data();
    problem.grads = grad_ptrs.data();
    problem.alpha = alpha;
    problem.beta = beta;
    problem.grad_scale = scale;
    run_kernels(check.op, [&] { ff::fisher_accumulate(problem, target); });
  }
}

// ---------------------------------------------------------------------------------- fisher_score

at::Tensor fisher_score_impl(bool on_cuda, at::TensorList directions, at::TensorList grads,
                             at::TensorList fishers) {
  Checker check{"fisherforget_C::fisher_score", on_cuda};
  const size_t n = grads.size();
  check.list_length(directions.size(), n, "directions", "one per grad");
  check.list_length(fishers.size(), n, "fishers", "one per grad");
  if (n == 0) return at::zeros({2}, at::TensorOptions().dtype(at::kDouble));
  check.set_device(grads[0], "grads[0]");
  std::vector<std::tuple<ff::DType, ff::DType, ff::DType>> keys(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string d_name = item_name("directions", i), g_name = item_name("grads", i),
                      f_name = item_name("fishers", i);
    check.tensor(directions[i], d_name);
    check.tensor(grads[i], g_name);
    check.tensor(fishers[i], f_name);
    check.same_shape(directions[i], d_name, grads[i], g_name);
    check.same_shape(fishers[i], f_name, grads[i], g_name);
    keys[i] = std::make_tuple(check.dtype(directions[i], d_name, true),
                              check.dtype(grads[i], g_name, true),
                              check.dtype(fishers[i], f_name, false));
  }
  std::optional<c10::cuda::CUDAGuard> guard;
  if (on_cuda) guard.emplace(check.device);
  const ff::ExecTarget target = exec_target(check);
  const auto groups = group_by(keys);
  std::vector<std::vector<int64_t>> numels(groups.size());
  int64_t total_blocks = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    for (size_t i : groups[g]) numels[g].push_back(grads[i].numel());
    total_blocks += ff::fisher_score_num_blocks(static_cast<int64_t>(numels[g].size()),
                                                numels[g].data());
  }
  const auto options = at::TensorOptions().dtype(at::kDouble).device(check.device);
  at::Tensor partials = at::empty({2 * std::max<int64_t>(total_blocks, 1)}, options);
  at::Tensor out = at::empty({2}, options);
  int64_t first_block = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    std::vector<const void*> d_ptrs, g_ptrs, f_ptrs;
    for (size_t i : groups[g]) {
      d_ptrs.push_back(directions[i].data_ptr());
      g_ptrs.push_back(grads[i].data_ptr());
      f_ptrs.push_back(fishers[i].data_ptr());
    }
    ff::FisherScoreProblem problem;
    problem.num_tensors = static_cast<int64_t>(groups[g].size());
    problem.numels = numels[g].data();
    std::tie(problem.direction_dtype, problem.grad_dtype, problem.fisher_dtype) =
        keys[groups[g][0]];
    problem.directions = d_ptrs.data();
    problem.grads = g_ptrs.data();
    problem.fishers = f_ptrs.data();
    problem.partials = partials.data_ptr<double>();
    problem.first_block = first_block;
    run_kernels(check.op, [&] { ff::fisher_score_partials(problem, target); });
    first_block += ff::fisher_score_num_blocks(problem.num_tensors, problem.numels);
  }
  run_kernels(check.op, [&] {
    ff::fisher_score_finalize(partials.data_ptr<double>(), total_blocks, out.data_ptr<double>(),
                              target);
  });
  return out;
}

// ------------------------------------------------------------------------------- registrations

template <bool kOnCuda>
void fused_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                       at::TensorList fishers, const c10::List<std::optional<at::Tensor>>& masks,
                       at::TensorList steps, at::TensorList fisher_counts, double lr,
                       const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                       double eps, double weight_decay, bool amsgrad, bool maximize,
                       std::optional<c10::string_view> fisher_mode, double fisher_beta,
                       double fisher_scale, std::optional<double> freeze_above,
                       std::optional<double> freeze_below,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
  fused_step_impl(kOnCuda, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks,
                  steps, fisher_counts, lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad,
                  maximize, fisher_mode, fisher_beta, fisher_scale, freeze_above, freeze_below,
                  grad_scale, found_inf);
}

template <bool kOnCuda>
void fisher_accumulate_op(at::TensorList fishers, at::TensorList grads, double alpha,
                              double beta, const std::optional<at::Tensor>& grad_scale) {
  fisher_accumulate_impl(kOnCuda, fishers, grads, alpha, beta, grad_scale);
}

template <bool kOnCuda>
at::Tensor fisher_score_op(at::TensorList directions, at::TensorList grads,
                               at::TensorList fishers) {
  return fisher_score_impl(kOnCuda, directions, grads, fishers);
}

std::string build_info() {
  std::ostringstream out;
  out << "archs=" << ff::compiled_cuda_archs() << ";cuda=" << ff::compiled_cuda_version();
  return out.str();
}

}  // namespace

TORCH_LIBRARY(fisherforget_C, m) {
  m.def(
      "fused_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] fishers, "
      "Tensor?[] masks, Tensor(f!)[] steps, Tensor(g!)[] fisher_counts, *, float lr, "
      "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
      "bool maximize, str? fisher_mode, float fisher_beta, float fisher_scale, "
      "float? freeze_above, float? freeze_below, Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def(
      "fisher_accumulate(Tensor(a!)[] fishers, Tensor[] grads, *, float alpha, float beta, "
      "Tensor? grad_scale) -> ()");
  m.def("fisher_score(Tensor[] directions, Tensor[] grads, Tensor[] fishers) -> Tensor");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(fisherforget_C, CUDA, m) {
  m.impl("fused_step", &fused_step_op<true>);
  m.impl("fisher_accumulate", &fisher_accumulate_op<true>);
  m.impl("fisher_score", &fisher_score_op<true>);
}

TORCH_LIBRARY_IMPL(fisherforget_C, CPU, m) {
  m.impl("fused_step", &fused_step_op<false>);
  m.impl("fisher_accumulate", &fisher_accumulate_op<false>);
  m.impl("fisher_score", &fisher_score_op<false>);
}

// `import fisherforget._C` loads this library (registering the ops above); it has no Python API.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "fisherforget CUDA kernels; the ops live in torch.ops.fisherforget_C", -1, nullptr};
  return PyModule_Create(&module_def);
}
