"""Host-side staging shared by the backends: scalar tensors moved to each device once per call,
and contiguous stand-ins for non-contiguous tensors (written back after in-place ops)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class ScalarOnDevice:
    """A 0-dim tensor (lr, grad_scale, found_inf) on each device it is needed on, moved once per
    call and without a host sync."""

    def __init__(self, value: Optional[Tensor], name: str = "a 0-dim tensor argument"):
        self.value = value
        self.name = name
        self.cache: dict[torch.device, Tensor] = {}

    def on(self, device: torch.device) -> Optional[Tensor]:
        if self.value is None:
            return None
        if device not in self.cache:
            if (self.value.device.type == "cpu" and device.type == "cuda"
                    and torch.cuda.is_current_stream_capturing()):
                # A copy from pageable host memory cannot be captured (and a graph would replay
                # the value seen at capture, not the one set later).
                raise RuntimeError(
                    f"{self.name} is a CPU tensor, but a CUDA graph is being captured: pass it "
                    f"as a 0-dim tensor on {device} (updating it in place between replays)")
            self.cache[device] = self.value.reshape(()).to(device=device, non_blocking=True)
        return self.cache[device]


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
