"""The Fisher-estimation benchmark: ``fisherforget.ops.fisher_accumulate`` against plain torch.

Per call: ``F = alpha*F + beta*g^2`` over a workload's tensors (``alpha = 0.99``,
``beta = 0.01``: one EMA update of the Fisher outside the optimizer step, as
``fisherforget.fisher`` does per batch). Minimum bytes per element: read F and g, write F:
12 B for fp32 gradients, 10 B for bf16.
"""

from __future__ import annotations

import torch

from fisherforget import ops
from benchmarks import baselines
from benchmarks.core import Built, Variant, op_backend_variants, replica_generator
from benchmarks.workloads import DtypeConfig, Workload

SETTINGS = ("default",)
ALPHA, BETA = 0.99, 0.01


class EstimateBenchmark:
    name = "estimate"
    title = "Fisher estimation (fisher_accumulate)"
    settings = SETTINGS
    baseline_note = ("torch-foreach: torch._foreach_mul_(F, alpha) + "
                     "torch._foreach_addcmul_(F, g, g, value=beta)")

    def bytes_note(self) -> str:
        return "minimum bytes/element: read F and g, write F, at their dtypes"

    def variants(self, device: torch.device, allow_interpreter: bool,
                 op_variants: bool) -> list[Variant]:
        out = [Variant("torch-foreach", "baseline", SETTINGS,
                       "torch._foreach_mul_ + torch._foreach_addcmul_")]
        return out + op_backend_variants('fisher_accumulate', SETTINGS, device, allow_interpreter)

    def build(self, variant: Variant, workload: Workload, dtypes: DtypeConfig, setting: str,
              device: torch.device, replica: int) -> Built:
        gen = replica_generator(device, workload, dtypes, replica)
        fishers, grads = [], []
        for shape in workload.shapes:
            fishers.append(torch.rand(shape, generator=gen, device=device,
                                      dtype=dtypes.fisher_dtype))
            grads.append(torch.randn(shape, generator=gen, device=device,
                                     dtype=dtypes.param_dtype))
        kinds = dict(fisher=dtypes.fisher_dtype, grad=dtypes.param_dtype)
        if variant.kind == "baseline":
            def call():
                baselines.plain_fisher_accumulate(fishers, grads, alpha=ALPHA, beta=BETA)
        else:
            def call():
                ops.fisher_accumulate(fishers, grads, alpha=ALPHA, beta=BETA,
                                      backend=variant.backend)
        return Built(call=call, inputs=fishers + grads, dtypes=kinds)

    def min_bytes_per_element(self, built: Built, setting: str) -> float:
        return float(2 * built.dtypes["fisher"].itemsize + built.dtypes["grad"].itemsize)


BENCHMARK = EstimateBenchmark()
