"""The CPU backend against torch's fused CPU AdamW, per workload and thread count.

Two levels, each timed in one process with the variants interleaved (the VM is shared and noisy)
and the median of the repeats reported:

* kernel: ``fisherforget._C.fused_step`` (what backend "cpu" calls per bucket) with the Fisher
  (ema) and without, against ``torch._foreach_add_(steps, 1)`` + ``torch._fused_adamw_`` (what
  ``torch.optim.AdamW(fused=True)`` runs per step);
* optimizer: ``FisherAdamW(fisher="ema" or None, backend="auto").step()`` against
  ``torch.optim.AdamW(fused=True).step()``.

Usage: ``python benchmarks/cpu_kernels.py [repeats]``.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import fisherforget._C as kernels
from fisherforget import FisherAdamW

WORKLOADS = [(1, (1 << 22,), 3), (200, (32, 32), 20), (2000, (1,), 10)]  # tensors, shape, calls
# fused_step's scalars after the lists: lr, lr_tensor, betas, eps, weight_decay, amsgrad,
# maximize, fisher_mode, fisher_beta, fisher_scale, thresholds, grad_scale, found_inf.
HYPER = (1e-3, None, 0.9, 0.999, 1e-8, 1e-2, False, False)


def _median_times(fns: dict, calls: int, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def _kernel_level(n: int, shape: tuple, calls: int, repeats: int) -> dict:
    def make():
        return [torch.randn(shape) for _ in range(n)]

    p, g = make(), make()
    m, v, f = ([torch.zeros(shape) for _ in range(n)] for _ in range(3))
    steps, counts, torch_steps = ([torch.zeros(()) for _ in range(n)] for _ in range(3))
    masks = [None] * n

    def torch_fused():
        torch._foreach_add_(torch_steps, 1)
        torch._fused_adamw_(p, g, m, v, [], torch_steps, lr=1e-3, beta1=0.9, beta2=0.999,
                            weight_decay=1e-2, eps=1e-8, amsgrad=False, maximize=False)

    def ours(fisher: bool):
        kernels.fused_step(p, g, m, v, [], f if fisher else [], masks, steps,
                           counts if fisher else [], *HYPER, "ema" if fisher else None, 0.99,
                           0.0, None, None, None, None)

    return _median_times({"torch": torch_fused, "ema": lambda: ours(True),
                          "off": lambda: ours(False)}, calls, repeats)


def _optimizer_level(n: int, shape: tuple, calls: int, repeats: int) -> dict:
    def optimizer(cls, **kwargs):
        params = [torch.randn(shape, requires_grad=True) for _ in range(n)]
        for param in params:
            param.grad = torch.randn(shape)
        return cls(params, lr=1e-3, **kwargs)

    steps = {"torch": optimizer(torch.optim.AdamW, fused=True).step,
             "ema": optimizer(FisherAdamW, fisher="ema", backend="auto").step,
             "off": optimizer(FisherAdamW, fisher=None, backend="auto").step}
    return _median_times(steps, calls, repeats)


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    print(f"torch {torch.__version__}, CPU loops: {torch.ops.fisherforget_C.cpu_isa()}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n, shape, calls in WORKLOADS:
            for level, measure in (("kernel", _kernel_level), ("optimizer", _optimizer_level)):
                t = measure(n, shape, calls, repeats)
                print(f"{level:9} threads={threads} {n:>4} x {str(shape):>10}: torch "
                      f"{t['torch'] * 1e3:7.3f} ms | fisher ema {t['ema'] * 1e3:7.3f} ms "
                      f"({t['ema'] / t['torch']:.2f}x) | fisher off {t['off'] * 1e3:7.3f} ms "
                      f"({t['off'] / t['torch']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
