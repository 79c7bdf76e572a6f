"""Backend registry: which implementations of the ops exist here and which one ``auto`` picks.

Each backend is a module beside this one that registers its ops with
:func:`fisherforget.ops.register` when imported. Importing is lazy: a backend that cannot load
(no Triton, no built extension, no GPU) records why, and ``auto`` falls back to the next one.

``auto`` prefers, for CUDA tensors, ``cuda`` (the prebuilt extension) when it loads, else
``triton``, else ``reference``; for CPU tensors ``cpu`` (the extension's native CPU kernels) when
it loads, else ``reference``; other devices, and param dtypes the kernels lack (float64), get
``reference``. ``auto`` never compiles: a JIT build of the CUDA kernels happens only when
``backend="cuda"`` is asked for (or ``fisherforget build`` runs).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator, Optional

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")
BACKEND_CHOICES = ("auto",) + BACKENDS
_MODULES = {
    "reference": "fisherforget.backends.reference",
    "triton": "fisherforget.backends.triton",
    "cuda": "fisherforget.backends.cuda",
    "cpu": "fisherforget.backends.cpu",
}
# Param dtypes each compiled backend handles; anything else goes to the reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_loaded: dict[str, bool] = {}
_errors: dict[str, str] = {}
_build_tried: set[str] = set()  # backends whose availability was checked with build=True
_modules: dict[str, object] = {}  # imported backend modules (torch.compile cannot trace imports)
_host_only: frozenset = frozenset()  # backends under host_only()


def load(name: str, build: bool = False) -> bool:
    """Import backend ``name`` (registering its ops); return whether it is usable here.
    ``build``: an explicit request, which may compile (the CUDA JIT build); ``auto`` never does."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_CHOICES}")
    retry = build and _loaded.get(name) is False and name not in _build_tried
    if name not in _loaded or retry:
        try:
            module = importlib.import_module(_MODULES[name])
            _modules[name] = module
            check = getattr(module, "availability_error", None)
            if check is None:
                error = None
            elif name == "cuda":
                error = check(build=build)
            else:
                error = check()
        except Exception as exc:  # a backend that fails to import is unavailable, not fatal
            error = f"{type(exc).__name__}: {exc}"
        if build:
            _build_tried.add(name)
        _loaded[name] = error is None
        if error is not None:
            _errors[name] = error
        else:
            _errors.pop(name, None)
    return _loaded[name]


def is_available(name: str) -> bool:
    """Whether backend ``name`` can run here (or, under :func:`host_only`, do its host work)."""
    return name in _host_only or load(name)


def unavailable_reason(name: str) -> Optional[str]:
    load(name)
    return _errors.get(name)


def status() -> dict[str, Optional[str]]:
    """``{backend: None if available else the reason}`` for every backend."""
    return {name: (None if load(name) else _errors[name]) for name in BACKENDS}


@contextlib.contextmanager
def host_only(*names: str) -> Iterator[None]:
    """Within the block, the ops of backends ``names`` do their host work only, on tensors of any
    device, and write nothing: what ``python -m benchmarks overhead`` times (the host cost a GPU
    step pays, measured on any machine, CPU tensors standing in for the GPU's).

    ``reference`` and ``cpu`` skip their ops altogether (all of it is device work); ``triton``
    runs its glue and builds its address tables, and launches nothing; ``cuda`` runs its
    binding's checks, dtype groups and launch tables for ``fused_step`` and launches nothing
    (through ``fisherforget._C.dry_run_fused_step``, which only builds for the tests have,
    ``FISHERFORGET_TEST_OPS=1``), and skips ``fisher_accumulate``/``fisher_score``. Within the
    block, :func:`resolve` grants the backends ``names`` whatever device they are asked for.
    Raises naming the backend when one cannot do this here."""
    global _host_only
    for name in names:
        if name not in _MODULES:
            raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
        try:
            module = importlib.import_module(_MODULES[name])
        except Exception as exc:
            raise RuntimeError(f"host_only({name!r}): the backend does not import here "
                               f"({type(exc).__name__}: {exc})") from exc
        _modules[name] = module
        check = getattr(module, "host_only_error", None)
        error = check() if check is not None else None
        if error is not None:
            raise RuntimeError(f"host_only({name!r}): {error}")
    previous = _host_only
    _host_only = previous | frozenset(names)
    try:
        yield
    finally:
        _host_only = previous


def is_host_only(name: str) -> bool:
    """Whether backend ``name`` runs its host work only (:func:`host_only`)."""
    return name in _host_only


def runs_on(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on tensors of ``device``.

    The Triton backend also runs on CPU tensors when ``TRITON_INTERPRET=1`` (tests).
    """
    if name == "reference":
        return True
    if not load(name):
        return False
    return _modules[name].supports_device(device)


def resolve(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs a bucket of ``dtype`` tensors on ``device``.

    ``auto`` never fails: it falls back to the reference. An explicit backend that is not
    available, or cannot run on ``device``/``dtype``, raises a ``RuntimeError`` saying why.
    """
    if requested == "reference" or requested in _host_only:
        return requested
    if requested == "auto":
        if dtype in KERNEL_DTYPES:
            if device.type == "cuda":
                for name in ("cuda", "triton"):
                    if runs_on(name, device):
                        return name
            elif device.type == "cpu" and runs_on("cpu", device):
                return "cpu"
        return "reference"
    if requested not in _MODULES:
        raise ValueError(f"unknown backend {requested!r}; choose one of {BACKEND_CHOICES}")
    if not load(requested, build=True):
        raise RuntimeError(
            f"backend={requested!r} was requested but is not available: {_errors[requested]}"
        )
    if not runs_on(requested, device):
        raise RuntimeError(f"backend={requested!r} cannot run on {device} tensors")
    if dtype not in KERNEL_DTYPES:
        raise RuntimeError(
            f"backend={requested!r} supports params of dtypes {KERNEL_DTYPES}, got {dtype}; "
            "use backend='reference' or 'auto'"
        )
    return requested
