"""Host-side staging shared by the backends: scalar tensors moved to each device once per call,
and contiguous stand-ins for non-contiguous tensors (written back after in-place ops)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class ScalarOnDevice:
    """The one rule for the step's scalar tensors (a tensor ``lr``, ``grad_scale``,
    ``found_inf``), the same on every backend: a one-element floating tensor on any device is
    used on the params' device, copied there at most once per call and without a host sync
    (``non_blocking``); its dtype is kept unless the kernels read a fixed one (``dtype``).

    Inside CUDA-graph capture no copy is made: a graph cannot capture a copy from pageable host
    memory, a copy from another GPU waits on that GPU's stream (outside the capture), and a
    replay would read the value seen at capture instead of the one set later. A scalar that is
    not already on the capturing device is refused, naming it."""

    def __init__(self, value: Optional[Tensor], name: str = "a 0-dim tensor argument"):
        self.value = value
        self.name = name
        self.cache: dict[tuple[torch.device, Optional[torch.dtype]], Tensor] = {}

    def on(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
        key = (device, dtype)
        if key not in self.cache:
            self.cache[key] = scalar_on(self.value, device, self.name, dtype)
        return self.cache[key]


def scalar_on(value: Optional[Tensor], device: torch.device, name: str,
              dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    """``value`` (None, or a one-element tensor) as a 0-dim tensor on ``device`` (of ``dtype``
    when given), by the rule of :class:`ScalarOnDevice`; no copy when it is there already."""
    if value is None:
        return None
    target = value.dtype if dtype is None else dtype
    if value.device == device and value.dtype == target:
        return value if value.dim() == 0 else value.reshape(())
    if value.device != device and _capturing(device, value.device):
        raise RuntimeError(
            f"{name} is a tensor on {value.device}, but a CUDA graph is being captured on "
            f"{device}: pass it as a one-element tensor on {device} (updated in place between "
            "replays)")
    return value.reshape(()).to(device=device, dtype=target, non_blocking=True)


def step_scalars_on(hyper, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                    device: torch.device):
    """A step's scalars where compiled kernels read them, by the rule of :func:`scalar_on`: a
    tensor lr with its dtype kept (a float64 lr keeps float64 math for ``1 - lr * weight_decay``),
    grad_scale/found_inf as fp32. Returns ``(hyper, grad_scale, found_inf)``."""
    if isinstance(hyper.lr, Tensor):
        hyper = hyper.replace(lr=scalar_on(hyper.lr, device, "lr"))
    return (hyper, scalar_on(grad_scale, device, "grad_scale", torch.float32),
            scalar_on(found_inf, device, "found_inf", torch.float32))


def _capturing(*devices: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream (only asked when a CUDA
    device is involved: the query initialises CUDA)."""
    return any(d.type == "cuda" for d in devices) and torch.cuda.is_current_stream_capturing()


class ContiguousStaging:
    """Contiguous stand-ins for non-contiguous tensors; in-place ones are copied back by
    :meth:`finish`."""

    def __init__(self):
        self._write_back: list[tuple[Tensor, Tensor]] = []

    def read(self, tensors: list) -> list:
        present = [t for t in tensors if t is not None]
        if all(map(Tensor.is_contiguous, present)):
            return tensors
        return [t if t is None or t.is_contiguous() else t.contiguous() for t in tensors]

    def inplace(self, tensors: list) -> list:
        if all(map(Tensor.is_contiguous, tensors)):
            return tensors
        out = []
        for t in tensors:
            if not t.is_contiguous():
                copy = t.contiguous()
                self._write_back.append((t, copy))
                t = copy
            out.append(t)
        return out

    def finish(self) -> None:
        for original, copy in self._write_back:
            original.copy_(copy)
        self._write_back.clear()
