"""What a benchmark ran on: device, versions, commit, machine load (in every results file)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

import fisherforget
from fisherforget import backends

_REPO_ROOT = Path(fisherforget.__file__).resolve().parent.parent


def _version(distribution: str) -> Optional[str]:
    """Installed version, read from package metadata (importing transformers takes seconds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict[str, Any]:
    """The commit of the fisherforget source tree that ran, and whether it had local edits.

    ``FISHERFORGET_GIT_COMMIT`` overrides it for copies of the tree without ``.git`` (e.g. a
    device machine that received the working tree only).
    """
    override = os.environ.get("FISHERFORGET_GIT_COMMIT")
    if override:
        return {"commit": override, "dirty": None, "source": "FISHERFORGET_GIT_COMMIT"}
    # Only a source checkout has a commit: an installed copy may sit inside some other repository.
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=_REPO_ROOT)
    if top is None or Path(top).resolve() != _REPO_ROOT:
        return {"commit": None, "dirty": None,
                "source": "not a git checkout (set FISHERFORGET_GIT_COMMIT)"}
    commit = _run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT)
    # Untracked files and committed results being rewritten do not change what ran.
    status = _run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                   ":(exclude)benchmarks/results"], cwd=_REPO_ROOT)
    return {"commit": commit, "dirty": bool(status), "source": "git"}


def cache_bytes(device: torch.device) -> int:
    """Last-level cache size: L2 of a GPU, L3 of the CPU (fallback 32 MiB)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    for index in (3, 2):
        path = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text and text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        if text.isdigit():
            return int(text)
    return 32 * 2**20


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe_device(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info: dict[str, Any] = {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "capability": "sm_%d%d" % torch.cuda.get_device_capability(device),
            "memory_bytes": int(props.total_memory),
            "multiprocessors": int(props.multi_processor_count),
            "l2_cache_bytes": cache_bytes(device),
        }
        smi = _run([
            "nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
            "--format=csv,noheader", f"--id={device.index or 0}",
        ])
        if smi:
            info["nvidia_smi"] = smi
        return info
    return {
        "type": device.type,
        "name": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "last_level_cache_bytes": cache_bytes(device),
    }


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions, commit and time of a benchmark run (JSON-ready)."""
    return {
        "device": describe_device(device),
        "versions": {
            "fisherforget": fisherforget.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": _version("triton") or _version("pytorch-triton"),
            "transformers": _version("transformers"),
            "numpy": _version("numpy"),
        },
        "backends": {name: reason for name, reason in backends.status().items()},
        "git": git_commit(),
        "platform": platform.platform(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": load_average(),
    }
