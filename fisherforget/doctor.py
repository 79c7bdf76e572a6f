"""``fisherforget doctor``: what is installed, which devices are visible, which backends work."""

from __future__ import annotations

import importlib
import platform
from typing import Any

import torch

import fisherforget
from fisherforget import backends


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:
        return "not installed"


def _cuda_extension() -> dict[str, str]:
    """Whether the prebuilt ``fisherforget._C`` is there (and for which GPUs), what the ``cuda``
    backend loaded, and where a JIT build is cached."""
    from fisherforget.backends import cpu, cuda
    from fisherforget.backends.cuda import jit as cuda_jit

    error = cuda.load_prebuilt()
    cpu_only = error is None and "cuda" not in cpu.build_info().get("kernels", "cuda").split(",")
    if cpu_only:
        prebuilt = "built with the CPU kernels only (no nvcc or no CUDA torch at build time)"
    elif error is None:
        info = cuda.build_info()
        prebuilt = f"built for {info['archs']} (CUDA {info['cuda']})"
    else:
        prebuilt = f"not built ({error})"
    loaded = cuda.library_source()
    if cpu_only:
        loaded = "no CUDA kernels (the prebuilt _C has none)"
    elif loaded is not None:
        info = cuda.build_info()
        loaded = f"{loaded}: {info['archs']} (CUDA {info['cuda']})"
    jit_dir = cuda_jit.jit_build_dir()
    jit = (f"{jit_dir} ({'built' if jit_dir.is_dir() else 'empty'})" if jit_dir is not None
           else f"{cuda_jit.cache_root()} (no JIT build possible here: no nvcc or no csrc/)")
    return {"prebuilt _C": prebuilt, "loaded": loaded or "not loaded", "JIT cache": jit}


def _cpu_kernels() -> str:
    """The native CPU kernels of ``_C``: which inner loops (AVX2 or scalar) and how many threads."""
    from fisherforget.backends import cpu

    error = cpu.availability_error()
    if error is not None:
        return f"unavailable ({error})"
    return f"available ({cpu.isa()}, {torch.get_num_threads()} threads)"


def report() -> dict[str, Any]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [
            f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())
        ]
    status = backends.status()
    auto = {
        "cpu": backends.resolve("auto", torch.device("cpu"), torch.float32),
    }
    if torch.cuda.is_available():
        auto["cuda"] = backends.resolve("auto", torch.device("cuda"), torch.float32)
    return {
        "fisherforget": fisherforget.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "devices": devices,
        "backends": {name: ("available" if why is None else f"unavailable: {why}")
                     for name, why in status.items()},
        "auto_picks": auto,
        "cpu_kernels": _cpu_kernels(),
        "cuda_extension": _cuda_extension(),
    }


def main() -> int:
    info = report()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key:<{width}}")
            for k, v in value.items():
                print(f"  {k:<{width}} {v}")
        elif isinstance(value, list):
            print(f"{key:<{width}} {', '.join(value)}")
        else:
            print(f"{key:<{width}} {value}")
    return 0
