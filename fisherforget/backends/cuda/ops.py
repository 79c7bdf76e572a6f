"""CUDA backend: the hand-written kernels of ``csrc/``, registered as ``torch.ops.fisherforget_C``.

The kernels come from the prebuilt extension ``fisherforget._C`` (compiled by ``pip install``) or,
where that does not import but a GPU and nvcc exist, from a JIT build of the same sources
(:mod:`fisherforget.backends.cuda.jit`). Each op launches a few multi-tensor kernels per dtype
group (chunked address tables, as ``torch``'s fused optimizers); everything stays on the device:
a tensor ``lr``, ``grad_scale``, ``found_inf`` and the step counts are read by the kernels.

This module is the Python glue. ``fused_step`` (the optimizer's hot path) does no per-tensor work:
it calls ``fisherforget._C.fused_step``, which reads the tensor lists in place (a ``torch.ops``
call would convert nine lists of thousands of tensors), checks them, steps non-contiguous tensors
through contiguous copies and launches; a JIT build is called through ``torch.ops``. The Fisher
ops pass contiguous tensors (working on contiguous copies, written back). Fake implementations
let ``torch.compile`` trace the ops.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fisherforget import _native, backends, ops
from fisherforget.backends.cuda import jit as cuda_jit
from fisherforget.backends.staging import ContiguousStaging, scalar_on, step_scalars_on

# The extension's op schemas; fused_step's is generated from the op contract (a test compares
# them with what csrc/bindings.cpp registers).
SCHEMAS = {
    "fused_step": ops.fused_step_schema("fisherforget_C", backend_arg=False),
    "fisher_accumulate": (
        "fisherforget_C::fisher_accumulate(Tensor(a!)[] fishers, Tensor[] grads, *, float alpha, "
        "float beta, Tensor? grad_scale) -> ()"
    ),
    "fisher_score": (
        "fisherforget_C::fisher_score(Tensor[] directions, Tensor[] grads, Tensor[] fishers) "
        "-> Tensor"
    ),
}

_library_error: Optional[str] = None
_library_source: Optional[str] = None  # how the ops were loaded, once they are
_jit_tried = False
_fakes_registered = False


def _ops_registered() -> bool:
    try:
        torch.ops.fisherforget_C.fused_step  # noqa: B018  (attribute lookup resolves the op)
    except (AttributeError, RuntimeError):
        return False
    return True


def load_prebuilt() -> Optional[str]:
    """Import the prebuilt ``fisherforget._C``; None on success, else the import error."""
    global _library_source
    try:
        import fisherforget._C  # noqa: F401  (registers torch.ops.fisherforget_C)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    _library_source = _library_source or "prebuilt fisherforget._C"
    _register_fakes()
    return None


def load_library(build: bool = False) -> Optional[str]:
    """Load the kernels: the prebuilt ``fisherforget._C``, else a finished JIT build from the
    cache (loaded as is); only with ``build`` (an explicit ``backend="cuda"``, or
    ``fisherforget build``), else a JIT build (needs a GPU, nvcc and ninja), so that ``auto``
    never compiles inside a step.

    Returns None when ``torch.ops.fisherforget_C`` is ready, else why not. Remembers the outcome
    (a failure without ``build`` is retried once with it).
    """
    global _library_error, _library_source, _jit_tried
    if _library_source is not None:
        return None
    if _library_error is not None and (_jit_tried or not build):
        return _library_error
    if _ops_registered():  # loaded by other means (e.g. a test imported the library)
        _library_source = "already loaded"
        _register_fakes()
        return None
    prebuilt_error = load_prebuilt()
    if prebuilt_error is None:
        return None
    cached = cuda_jit.load_cached() if torch.cuda.is_available() else None
    if cached is not None:
        _library_source = f"cached JIT build in {cached}"
        _register_fakes()
        return None
    if not build:
        _library_error = (f"fisherforget._C is not built ({prebuilt_error}); backend 'auto' never "
                          "compiles: run `fisherforget build` once, or pass backend='cuda' to "
                          "build the kernels (JIT, cached) at the first step")
        return _library_error
    _jit_tried = True
    if not torch.cuda.is_available():
        _library_error = (f"fisherforget._C is not built ({prebuilt_error}) and no GPU is visible "
                          "for a JIT build")
        return _library_error
    try:
        build_dir = cuda_jit.load()
    except cuda_jit.JitBuildError as exc:
        _library_error = f"fisherforget._C is not built ({prebuilt_error}); JIT build: {exc}"
        return _library_error
    _library_source = f"JIT build in {build_dir}"
    _library_error = None
    _register_fakes()
    return None


def build_kernels() -> tuple[bool, str]:
    """``fisherforget build``: make the CUDA kernels loadable here, compiling them (JIT, cached)
    when no prebuilt ``fisherforget._C`` carries them. ``(ok, what happened or what is missing)``."""
    error = load_library(build=True)
    if error is not None:
        return False, error
    error = _kernels_error()
    if error is not None:
        return False, error
    info = build_info()
    return True, (f"the CUDA kernels are ready: {_library_source} (archs {info['archs']}, "
                  f"CUDA {info['cuda']})")


def library_source() -> Optional[str]:
    return _library_source


def availability_error(build: bool = False) -> Optional[str]:
    """Why the backend cannot run here, or None; ``build`` allows a JIT build (see
    :func:`load_library`)."""
    if torch.version.cuda is None:
        return "torch was built without CUDA (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return load_library(build) or _kernels_error() or _arch_error()


def _kernels_error() -> Optional[str]:
    """Why the loaded library has no CUDA kernels (a CPU-only build of ``fisherforget._C``), or
    None. Its ops exist but have no CUDA implementation, and a JIT build cannot be loaded beside
    it (both would register the ``fisherforget_C`` ops)."""
    info = torch.ops.fisherforget_C.build_info()
    fields = dict(item.split("=", 1) for item in info.split(";") if "=" in item)
    if "kernels" in fields:
        has_cuda = "cuda" in fields["kernels"].split(",")
    else:  # builds before the field was added had CUDA kernels exactly when cuda= is set
        has_cuda = fields.get("cuda", "0") not in ("", "0")
    if has_cuda:
        return None
    return (f"fisherforget._C was built with the CPU kernels only ({info}); reinstall where nvcc "
            "is found (`FISHERFORGET_CUDA=1 pip install --no-build-isolation .` says why not)")


def _compiled_archs() -> list[tuple[int, int]]:
    archs = torch.ops.fisherforget_C.build_info().split(";")[0].removeprefix("archs=")
    return sorted((int(a) // 100, int(a) % 100 // 10) for a in archs.split(",") if a.isdigit())


def _arch_error() -> Optional[str]:
    """Why the loaded kernels cannot run on a visible GPU, or None.

    A cubin for sm_XY runs on sm_XZ with Z >= Y; the highest architecture also carries PTX (the
    default +PTX), which the driver compiles for any newer GPU.
    """
    compiled = _compiled_archs()
    if not compiled:
        return None
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        runs = any(a_major == major and a_minor <= minor for a_major, a_minor in compiled)
        if not runs and compiled[-1] > (major, minor):
            names = ", ".join(f"sm_{a}{b}" for a, b in compiled)
            return (f"the CUDA kernels were built for {names} but cuda:{index} is sm_{major}{minor}; "
                    f"reinstall with TORCH_CUDA_ARCH_LIST={major}.{minor}")
    return None


def supports_device(device: Union[str, torch.device]) -> bool:
    return torch.device(device).type == "cuda" or backends.is_host_only("cuda")


def host_only_error() -> Optional[str]:
    """Why ``backends.host_only("cuda")`` cannot run here, or None: it needs the prebuilt
    extension with its CUDA binding's dry run (a build for the tests), not a GPU."""
    error = load_prebuilt() or _kernels_error()
    if error is None and not hasattr(_native.helpers(), "dry_run_fused_step"):
        error = ("fisherforget._C has no dry_run_fused_step: it is built for the tests only "
                 "(FISHERFORGET_TEST_OPS=1, as `make install` builds it)")
    return error


def build_info() -> dict[str, str]:
    """``{"archs": "sm_80, sm_90", "cuda": "13.0"}`` of the loaded kernels (requires them loaded)."""
    fields = dict(item.split("=", 1) for item in torch.ops.fisherforget_C.build_info().split(";"))
    archs = ", ".join(f"sm_{int(a) // 10}" for a in fields.get("archs", "").split(",") if a.isdigit())
    version = int(fields.get("cuda", "0"))
    return {"archs": archs or fields.get("archs", "unknown"),
            "cuda": f"{version // 1000}.{version % 1000 // 10}"}


# ---------------------------------------------------------------------------------- fake kernels


def _register_fakes() -> None:
    """Fake (meta) implementations: shapes only, so torch.compile can trace the ops."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("fisherforget_C::fused_step")
    def _fused_step_fake(*args, **kwargs) -> None:  # mutates its inputs, returns nothing
        return None

    @torch.library.register_fake("fisherforget_C::fisher_accumulate")
    def _fisher_accumulate_fake(*args, **kwargs) -> None:
        return None

    @torch.library.register_fake("fisherforget_C::fisher_score")
    def _fisher_score_fake(directions, grads, fishers) -> Tensor:
        device = grads[0].device if len(grads) else torch.device("cpu")
        return torch.empty(2, dtype=torch.float64, device=device)


# ------------------------------------------------------------------------------------------ glue


def _python_entry():
    """``fisherforget._C`` when it is the loaded library (its ``fused_step`` reads the Python lists
    in place), else None: a JIT build is reached through ``torch.ops`` only, and so is a traced
    call (``torch.compile`` traces ``torch.ops``, not extension functions)."""
    if backends.is_host_only("cuda"):
        return _DryRun
    if _library_source is None or "JIT" in _library_source or torch.compiler.is_compiling():
        return None
    return _native.helpers()


class _DryRun:
    """The entry under ``backends.host_only("cuda")``: the binding's host work, no launch."""

    @staticmethod
    def fused_step(*args) -> None:
        _native.helpers().dry_run_fused_step(*args)


@ops.register("fused_step", "cuda")
def fused_step(
    tensors: ops.StepTensors,
    hyper: ops.StepHyper,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    # No per-tensor work here: the binding checks every tensor and steps non-contiguous ones
    # through contiguous copies. The scalars follow the rule every backend follows (staging).
    if len(tensors.params) == 0:
        return
    device = tensors.params[0].device
    hyper, scale, inf = step_scalars_on(hyper, grad_scale, found_inf, device)
    entry = _python_entry()
    if entry is not None:
        # A tensor lr keeps its dtype (float64 keeps float64 math for 1 - lr * weight_decay).
        entry.fused_step(*tensors, *hyper.op_args(), scale, inf)
        return
    torch.ops.fisherforget_C.fused_step(*map(list, tensors), **hyper.op_kwargs(),
                                        grad_scale=scale, found_inf=inf)


@ops.register("fisher_accumulate", "cuda")
def fisher_accumulate(
    fishers: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    alpha: float,
    beta: float,
    grad_scale: Optional[Tensor] = None,
) -> None:
    if len(fishers) == 0 or backends.is_host_only("cuda"):
        return
    staging = ContiguousStaging()
    torch.ops.fisherforget_C.fisher_accumulate(
        staging.inplace(list(fishers)), staging.read(list(grads)), alpha=float(alpha),
        beta=float(beta),
        grad_scale=scalar_on(grad_scale, fishers[0].device, "grad_scale", torch.float32),
    )
    staging.finish()


@ops.register("fisher_score", "cuda")
def fisher_score(
    directions: Sequence[Tensor], grads: Sequence[Tensor], fishers: Sequence[Tensor]
) -> Tensor:
    if len(grads) == 0 or backends.is_host_only("cuda"):
        return torch.zeros(2, dtype=torch.float64)  # as the reference: no tensors, no device
    staging = ContiguousStaging()
    return torch.ops.fisherforget_C.fisher_score(
        staging.read(list(directions)), staging.read(list(grads)), staging.read(list(fishers))
    )
