// fused_step instantiations for float params (one file per param dtype bounds compile time).
#include "fused_step.cuh"

namespace fisherforget {

void fused_step_f32(const FusedStepProblem& problem, const ExecTarget& target) {
  dispatch_state_and_fisher<float>(problem, target);
}

}  // namespace fisherforget
