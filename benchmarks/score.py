"""The Fisher-score benchmark: ``fisherforget.ops.fisher_score`` against plain torch.

Per call: ``[sum <d, g>, sum <F, g^2>]`` over a workload's tensors, with ``d`` the learning-task
direction (fp32, like the bias-corrected ``exp_avg``), ``g`` a sample's gradient (param dtype) and
``F`` the learning-task Fisher (fp32). Minimum bytes per element: one read of each, 12 B for fp32
gradients, 10 B for bf16.
"""

from __future__ import annotations

import torch

from fisherforget import ops
from benchmarks import baselines
from benchmarks.core import Built, Variant, op_backend_variants, replica_generator
from benchmarks.workloads import DtypeConfig, Workload

SETTINGS = ("default",)


class ScoreBenchmark:
    name = "score"
    title = "Fisher score"
    settings = SETTINGS
    baseline_note = ("torch-plain: one torch.dot pair per tensor (fp32 accumulation), "
                     "summed in float64")

    def bytes_note(self) -> str:
        return "minimum bytes/element: read d, g, F once each, at their dtypes"

    def variants(self, device: torch.device, allow_interpreter: bool,
                 op_variants: bool) -> list[Variant]:
        out = [Variant("torch-plain", "baseline", SETTINGS,
                       "per-tensor torch.dot(d, g) and torch.dot(F, g*g), float64 sum")]
        return out + op_backend_variants('fisher_score', SETTINGS, device, allow_interpreter)

    def build(self, variant: Variant, workload: Workload, dtypes: DtypeConfig, setting: str,
              device: torch.device, replica: int) -> Built:
        gen = replica_generator(device, workload, dtypes, replica)
        directions, grads, fishers = [], [], []
        for shape in workload.shapes:
            directions.append(torch.randn(shape, generator=gen, device=device,
                                          dtype=dtypes.state_dtype))
            grads.append(torch.randn(shape, generator=gen, device=device,
                                     dtype=dtypes.param_dtype))
            fishers.append(torch.rand(shape, generator=gen, device=device,
                                      dtype=dtypes.fisher_dtype))
        kinds = dict(direction=dtypes.state_dtype, grad=dtypes.param_dtype,
                     fisher=dtypes.fisher_dtype)
        if variant.kind == "baseline":
            def call():
                return baselines.plain_fisher_score(directions, grads, fishers)
        else:
            def call():
                return ops.fisher_score(directions, grads, fishers, backend=variant.backend)
        return Built(call=call, inputs=directions + grads + fishers, dtypes=kinds)

    def min_bytes_per_element(self, built: Built, setting: str) -> float:
        return float(sum(dtype.itemsize for dtype in built.dtypes.values()))


BENCHMARK = ScoreBenchmark()
