// fused_step instantiations for __half params (one file per param dtype bounds compile time).
#include "fused_step.cuh"

namespace fisherforget {

void fused_step_f16(const FusedStepProblem& problem, const ExecTarget& target) {
  dispatch_state_and_fisher<__half>(problem, target);
}

}  // namespace fisherforget
