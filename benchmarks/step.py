"""The optimizer-step benchmark: one ``step()`` over a workload's parameters.

Settings (the same hyperparameters everywhere: lr 1e-3, betas (0.9, 0.999), eps 1e-8,
weight decay 0.01, Fisher EMA beta 0.99, ``fisher_scale`` 0):

``off``
    plain AdamW: ``torch.optim.AdamW`` foreach and fused, and ours with ``fisher=None``.
``fisher``
    AdamW + Fisher EMA accumulation: ours with ``fisher="ema"`` against the composition
    (fused AdamW + foreach Fisher).
``fisher+mask``
    the same with a mask (90% of the elements updated, 10% frozen): ours with ``set_mask``
    against the composition with mask restore.

Minimum bytes per element (each tensor read or written once, at its actual dtype)::

    param read + write, grad read, exp_avg and exp_avg_sq read + write     (off)
    + fisher read + write                                                  (fisher)
    + mask read (1 byte)                                                   (fisher+mask)

fp32 params and state: 28 / 36 / 37 B. bf16 params with fp32 state: 22 / 30 / 31 B. torch keeps
AdamW state in the param dtype, so its bf16 rows move 14 (and its composition 22 / 23) B.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fisherforget import backends, ops
from benchmarks import baselines
from benchmarks.core import Built, Variant, backend_variant_status, replica_generator
from benchmarks.workloads import DtypeConfig, Workload
from fisherforget.optim import FisherAdamW

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
FISHER_BETA = 0.99
MASK_KEEP_FRACTION = 0.9
SETTINGS = ("off", "fisher", "fisher+mask")


def _uses_fisher(setting: str) -> bool:
    return setting in ("fisher", "fisher+mask")


def _uses_mask(setting: str) -> bool:
    return setting == "fisher+mask"


class StepBenchmark:
    name = "step"
    title = "Optimizer step"
    settings = SETTINGS
    baseline_note = (
        "torch-adamw-foreach / torch-adamw-fused: torch.optim.AdamW (Fisher off; state in the "
        "param dtype). composition: torch.optim.AdamW(fused=True) + foreach Fisher EMA "
        "(+ snapshot and _foreach_lerp_ restore of the frozen elements), the same semantics "
        "as ours."
    )

    def bytes_note(self) -> str:
        return ("minimum bytes/element: param r+w, grad r, exp_avg and exp_avg_sq r+w, "
                "[+ fisher r+w] [+ 1 B mask], at each tensor's actual dtype")

    def variants(self, device: torch.device, allow_interpreter: bool,
                 op_variants: bool) -> list[Variant]:
        fused_reason = None
        if device.type not in ("cuda", "cpu"):
            fused_reason = f"torch.optim.AdamW(fused=True) does not run on {device.type}"
        out = [
            Variant("torch-adamw-foreach", "baseline", ("off",),
                    "torch.optim.AdamW(foreach=True)"),
            Variant("torch-adamw-fused", "baseline", ("off",),
                    "torch.optim.AdamW(fused=True)", unavailable=fused_reason),
            Variant("composition", "baseline", ("fisher", "fisher+mask"),
                    "AdamW(fused=True) + foreach Fisher EMA (+ mask restore)",
                    unavailable=fused_reason),
        ]
        for name in backends.BACKENDS:
            reason = backend_variant_status(name, device, allow_interpreter)
            out.append(Variant(
                f"fisherforget-{name}", "ours", SETTINGS,
                f"FisherAdamW(backend={name!r}).step()", backend=name, unavailable=reason,
                informative_only=name == "reference" and device.type != "cpu",
            ))
        if op_variants:
            for name in backends.BACKENDS:
                if name == "reference":
                    continue
                reason = backend_variant_status(name, device, allow_interpreter)
                out.append(Variant(
                    f"fisherforget-op-{name}", "ours", SETTINGS,
                    f"fisherforget.ops.fused_step(backend={name!r}) on prebuilt lists "
                    "(no optimizer bookkeeping)", backend=name, unavailable=reason,
                ))
        return out

    # ------------------------------------------------------------------ inputs

    def _inputs(self, workload: Workload, dtypes: DtypeConfig, device: torch.device,
                replica: int, with_mask: bool) -> tuple[list[Tensor], list[Optional[Tensor]]]:
        gen = replica_generator(device, workload, dtypes, replica)
        params, masks = [], []
        for shape in workload.shapes:
            p = torch.randn(shape, generator=gen, device=device, dtype=dtypes.param_dtype)
            p.mul_(0.02).requires_grad_(True)
            p.grad = torch.randn(shape, generator=gen, device=device, dtype=dtypes.param_dtype)
            p.grad.mul_(1e-3)
            params.append(p)
            if with_mask:
                masks.append(torch.rand(shape, generator=gen, device=device) < MASK_KEEP_FRACTION)
            else:
                masks.append(None)
        return params, masks

    def build(self, variant: Variant, workload: Workload, dtypes: DtypeConfig, setting: str,
              device: torch.device, replica: int) -> Built:
        params, masks = self._inputs(workload, dtypes, device, replica, _uses_mask(setting))
        grads = [p.grad for p in params]
        inputs = params + grads
        param_dtype = dtypes.param_dtype
        if variant.name.startswith("torch-adamw-"):
            opt = baselines.torch_adamw(params, impl=variant.name.rsplit("-", 1)[1], **HYPER)
            return Built(
                call=opt.step, inputs=inputs, state=lambda: _optimizer_state(opt),
                dtypes=dict(param=param_dtype, grad=param_dtype, state=param_dtype),
            )
        if variant.name == "composition":
            comp = baselines.FisherAdamWComposition(
                params, **HYPER, fisher_beta=FISHER_BETA,
                masks=masks if _uses_mask(setting) else None, fisher_dtype=dtypes.fisher_dtype,
            )
            kinds = dict(param=param_dtype, grad=param_dtype, state=param_dtype,
                         fisher=dtypes.fisher_dtype)
            if _uses_mask(setting):
                kinds["mask"] = torch.bool
            del masks  # the composition keeps its own (float) copies
            return Built(call=comp.step, inputs=inputs, state=comp.state_tensors, dtypes=kinds)
        kinds = dict(param=param_dtype, grad=param_dtype, state=dtypes.state_dtype)
        if _uses_fisher(setting):
            kinds["fisher"] = dtypes.fisher_dtype
        if _uses_mask(setting):
            kinds["mask"] = torch.bool
        if variant.name.startswith("fisherforget-op-"):
            return self._build_op(variant, params, grads, masks, setting, dtypes, kinds)
        opt = FisherAdamW(
            params, **HYPER, fisher="ema" if _uses_fisher(setting) else None,
            fisher_beta=FISHER_BETA, state_dtype=dtypes.state_dtype,
            fisher_dtype=dtypes.fisher_dtype, backend=variant.backend,
        )
        if _uses_mask(setting):
            for p, mask in zip(params, masks):
                opt.set_mask(p, mask)
        del masks  # set_mask keeps its own copy
        return Built(call=opt.step, inputs=inputs, state=lambda: _optimizer_state(opt),
                     dtypes=kinds)

    def _build_op(self, variant: Variant, params: list[Tensor], grads: list[Tensor],
                  masks: list[Optional[Tensor]], setting: str, dtypes: DtypeConfig,
                  kinds: dict) -> Built:
        device = params[0].device
        state = {
            "exp_avg": [torch.zeros(p.shape, dtype=dtypes.state_dtype, device=device)
                        for p in params],
            "exp_avg_sq": [torch.zeros(p.shape, dtype=dtypes.state_dtype, device=device)
                           for p in params],
            "step": [torch.zeros((), dtype=torch.float32, device=device) for _ in params],
        }
        if _uses_fisher(setting):
            state["fisher"] = [torch.zeros(p.shape, dtype=dtypes.fisher_dtype, device=device)
                               for p in params]
            state["fisher_count"] = [torch.zeros((), dtype=torch.float32, device=device)
                                     for _ in params]
        if _uses_mask(setting):
            state["mask"] = list(masks)
        beta1, beta2 = HYPER["betas"]
        tensors = ops.StepTensors(
            params, grads, state["exp_avg"], state["exp_avg_sq"], [], state.get("fisher", []),
            masks, state["step"], state.get("fisher_count", []))
        hyper = ops.StepHyper(
            lr=HYPER["lr"], beta1=beta1, beta2=beta2, eps=HYPER["eps"],
            weight_decay=HYPER["weight_decay"],
            fisher_mode="ema" if _uses_fisher(setting) else None, fisher_beta=FISHER_BETA)

        def call() -> None:
            ops.fused_step(tensors, hyper, backend=variant.backend)

        return Built(call=call, inputs=params + grads, state=lambda: state, dtypes=kinds)

    def min_bytes_per_element(self, built: Built, setting: str) -> float:
        d = built.dtypes
        size = lambda key: d[key].itemsize  # noqa: E731
        total = 2 * size("param") + size("grad") + 4 * size("state")
        if "fisher" in d:
            total += 2 * size("fisher")
        if "mask" in d:
            total += size("mask")
        return float(total)


def _optimizer_state(opt: torch.optim.Optimizer) -> dict[str, list[Tensor]]:
    """An optimizer's state tensors grouped by key (``exp_avg``, ``fisher``, ``mask``, ...)."""
    out: dict[str, list[Tensor]] = {}
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor):
                out.setdefault(key, []).append(value)
    return out


BENCHMARK = StepBenchmark()
