// fused_step instantiations for __nv_bfloat16 params (one file per param dtype bounds compile time).
#include "fused_step.cuh"

namespace fisherforget {

void fused_step_bf16(const FusedStepProblem& problem, const ExecTarget& target) {
  dispatch_state_and_fisher<__nv_bfloat16>(problem, target);
}

}  // namespace fisherforget
