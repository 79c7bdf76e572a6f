"""Finding the CUDA toolkit, and building the kernels of ``csrc/`` just in time.

Two users:

* ``setup.py`` loads this file by path (it imports nothing from ``fisherforget``) to find
  ``CUDA_HOME`` and the architectures when it prebuilds ``fisherforget._C``;
* the ``cuda`` backend calls :func:`load` when no prebuilt ``fisherforget._C`` imports but a GPU is
  visible: the same sources (the CPU kernels included) are compiled with ``torch.utils.cpp_extension.load`` (ninja) into a
  cache directory on first use and loaded from there afterwards.

Environment variables:

``FISHERFORGET_CUDA_JIT=0``
    never build just in time (the ``cuda`` backend is then unavailable without a prebuilt ``_C``).
``FISHERFORGET_CUDA_CACHE``
    the JIT cache root (default ``$XDG_CACHE_HOME/fisherforget`` or ``~/.cache/fisherforget``); each
    build lives in a subfolder keyed by the sources, torch, CUDA and the architectures.
``CUDA_HOME`` / ``CUDA_PATH``
    the toolkit folder (the one holding ``bin/nvcc``); found from ``nvcc`` otherwise.
``TORCH_CUDA_ARCH_LIST``
    architectures to compile for (default: the visible GPUs, else ``8.0;9.0+PTX``, either limited
    to what ``nvcc --list-gpu-arch`` lists).
``MAX_JOBS``
    parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

# Compiled when no GPU is visible: A100 and H100, plus PTX so newer GPUs can JIT the sm_90 code;
# filtered by what the toolkit supports (:func:`arch_list`).
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# The translation units of the extension, relative to csrc/ (headers: *.h, *.cuh). A CPU-only build
# (no nvcc, or torch without CUDA) compiles CPU_SOURCES; a CUDA build (and the JIT) compiles all.
CPU_SOURCES = (
    "bindings.cpp",
    "bindings_python.cpp",
    "cpu/kernels.cpp",
    "cpu/kernels_avx2.cpp",
)
CUDA_SOURCES = (
    "bindings_cuda.cpp",
    "fused_step.cu",
    "fused_step_f32.cu",
    "fused_step_bf16.cu",
    "fused_step_f16.cu",
    "fisher_accumulate.cu",
    "fisher_score.cu",
)
SOURCES = CPU_SOURCES + CUDA_SOURCES
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")
# -ffp-contract=off: the kernels round every fp32 operation as the reference backend does (an
# implicitly fused multiply-add would not); the fused ones are written as explicit fma calls.
# OpenMP: at::parallel_for (ATen's threads are OpenMP) is inline, so the extension itself must be
# compiled with it, or it runs on one thread; the runtime is the one torch already loaded.
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
EXTRA_CFLAGS = ["-O3", "-ffp-contract=off"] + _OPENMP
EXTRA_CUDA_CFLAGS = ["-O3"]
# Defined in builds that include the CUDA kernels (bindings.cpp reports them in build_info).
CUDA_DEFINE = "-DFISHERFORGET_WITH_CUDA"
JIT_LIBRARY_NAME = "fisherforget_C_jit"
# Defined in builds for the tests (FISHERFORGET_TEST_OPS=1, as `make install` sets): the
# emulated_* ops and dry_run_fused_step. A user's build (pip install, a JIT build) has neither.
TEST_OPS_DEFINE = "-DFISHERFORGET_TEST_OPS"


def test_ops_flags() -> list[str]:
    """``[TEST_OPS_DEFINE]`` when ``FISHERFORGET_TEST_OPS=1`` asks for a build for the tests."""
    return [TEST_OPS_DEFINE] if os.environ.get("FISHERFORGET_TEST_OPS", "").strip() == "1" else []


def link_flags() -> list[str]:
    """The extension's link flags: OpenMP, and the libstdc++ that this process (torch) loaded,
    named by path. A compiler whose own folder holds only a static libstdc++ (some images wrap
    g++ so) would otherwise give the extension a private copy, and C++ objects that cross into
    torch (a str result, an error message) then crash the process at the first op call. Named
    before the driver's own -lstdc++, the shared library resolves every symbol."""
    return _OPENMP + _loaded_libstdcxx()


def _loaded_libstdcxx() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return [path]
    except OSError:  # not Linux: the platform's own linking is left alone
        pass
    return []


class JitBuildError(RuntimeError):
    """The JIT build cannot run here or failed; the message says what is missing."""


# ------------------------------------------------------------------------------ toolkit discovery


def _first_existing(patterns: list[str]) -> Optional[str]:
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def toolkit_problem(home: str) -> Optional[str]:
    """Why ``home`` is not a usable CUDA toolkit folder, or None if it is one."""
    root = Path(home)
    if not (root / "bin" / "nvcc").is_file():
        return f"{home} has no bin/nvcc"
    if _first_existing([f"{home}/include/cuda_runtime.h",
                        f"{home}/targets/*/include/cuda_runtime.h"]) is None:
        return f"{home} has no include/cuda_runtime.h"
    if _first_existing([f"{home}/lib64/libcudart.so*", f"{home}/lib/libcudart.so*",
                        f"{home}/targets/*/lib/libcudart.so*", f"{home}/lib/x64/cudart.lib"]) is None:
        return f"{home} has no CUDA runtime library (libcudart)"
    return None


def _nvcc_reported_home(nvcc: str) -> Optional[str]:
    """The toolkit an ``nvcc`` on PATH really runs from, also when it is a wrapper script.

    ``nvcc --dryrun`` prints the commands it would run, including ``_HERE_=<toolkit>/bin``; the
    source file does not need to exist.
    """
    try:
        result = subprocess.run([nvcc, "--dryrun", "-c", "fisherforget_probe.cu"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"_HERE_=(\S+)", result.stdout + result.stderr)
    if match is None:
        return None
    return str(Path(match.group(1)).resolve().parent)


def find_cuda_home() -> tuple[Optional[str], str]:
    """``(toolkit folder, how it was found)``, or ``(None, why none was found)``.

    Order: ``$CUDA_HOME``/``$CUDA_PATH``; the ``nvcc`` on PATH (symlinks resolved, and what it
    reports when it is a wrapper script outside the toolkit); ``/usr/local/cuda``; a versioned
    ``/usr/local/cuda-X.Y`` matching torch's CUDA version. A folder counts only when it holds
    ``bin/nvcc``, ``cuda_runtime.h`` and the CUDA runtime library.
    """
    candidates: list[tuple[str, str]] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            candidates.append((value, f"${var}"))
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append((str(Path(nvcc).resolve().parent.parent), f"nvcc on PATH ({nvcc})"))
        reported = _nvcc_reported_home(nvcc)
        if reported is not None:
            candidates.append((reported, f"nvcc on PATH ({nvcc}) runs from it"))
    candidates.append(("/usr/local/cuda", "/usr/local/cuda"))
    torch_cuda = _torch_cuda_version()
    if torch_cuda:
        candidates.append((f"/usr/local/cuda-{torch_cuda}", f"/usr/local/cuda-{torch_cuda}"))
    rejected = []
    for home, how in candidates:
        problem = toolkit_problem(home)
        if problem is None:
            return str(Path(home).resolve()), how
        rejected.append(f"{how}: {problem}")
    if nvcc is None and not any(os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")):
        return None, "no nvcc on PATH and no CUDA_HOME set (" + "; ".join(rejected) + ")"
    return None, "no CUDA toolkit found (" + "; ".join(rejected) + ")"


def nvcc_version(home: str) -> Optional[str]:
    """``"13.0"`` from ``<home>/bin/nvcc --version``, or None."""
    try:
        result = subprocess.run([str(Path(home) / "bin" / "nvcc"), "--version"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", result.stdout)
    return match.group(1) if match else None


def _torch_cuda_version() -> Optional[str]:
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def version_problem(home: str) -> Optional[str]:
    """Why the toolkit at ``home`` cannot build for this torch (a different CUDA major), or None."""
    torch_cuda = _torch_cuda_version()
    if torch_cuda is None:
        return "torch was built without CUDA (torch.version.cuda is None)"
    found = nvcc_version(home)
    if found is None:
        return f"could not read the version of {home}/bin/nvcc"
    if found.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"CUDA version mismatch: nvcc in {home} is CUDA {found} but torch was built "
                f"with CUDA {torch_cuda}; install a CUDA {torch_cuda.split('.')[0]}.x toolkit "
                "or point CUDA_HOME at one")
    return None


def use_cuda_home(home: str) -> None:
    """Make torch's extension builder use ``home`` (it caches CUDA_HOME when first imported)."""
    os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = home


def ensure_ninja_on_path() -> bool:
    """Whether ninja can run; puts the ``ninja`` pip package's binary on PATH when only that is
    installed (a venv used without activating it)."""
    if shutil.which("ninja") is not None:
        return True
    try:
        import ninja
    except ImportError:
        return False
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and (Path(bin_dir) / "ninja").exists():
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        return True
    return False


def supported_archs(home: str) -> Optional[list[tuple[int, int]]]:
    """The virtual architectures ``<home>/bin/nvcc --list-gpu-arch`` supports, e.g. [(7, 5), ...,
    (12, 1)], or None when it cannot tell (an old nvcc without the option)."""
    try:
        result = subprocess.run([str(Path(home) / "bin" / "nvcc"), "--list-gpu-arch"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = sorted({(int(m.group(1)) // 10, int(m.group(1)) % 10)
                    for m in re.finditer(r"compute_(\d+)", result.stdout)})
    return found if result.returncode == 0 and found else None


def _parse_arch(arch: str) -> tuple[int, int]:
    major, minor = arch.replace("+PTX", "").split(".")
    return int(major), int(minor)


def _filter_archs(archs: list[str], supported: list[tuple[int, int]]) -> list[str]:
    """``archs`` (``"8.0"``, ...) that nvcc supports, the last with +PTX; when none is, the
    newest supported architecture below the lowest requested one, else the oldest supported."""
    kept = [a.replace("+PTX", "") for a in archs if _parse_arch(a) in supported]
    if not kept:
        lowest = min(_parse_arch(a) for a in archs)
        below = [s for s in supported if s <= lowest]
        major, minor = below[-1] if below else supported[0]
        kept = [f"{major}.{minor}"]
    kept[-1] += "+PTX"
    return kept


def arch_list(home: Optional[str] = None) -> tuple[str, str]:
    """``(TORCH_CUDA_ARCH_LIST value, where it came from)``.

    ``$TORCH_CUDA_ARCH_LIST`` is used as given. Otherwise the visible GPUs (clamped to the newest
    architecture torch supports), else :data:`DEFAULT_ARCH_LIST`; with the toolkit ``home``, these
    are filtered by what its nvcc supports (``nvcc --list-gpu-arch``: CUDA 11.7 has no sm_90), so
    that a default never asks for an architecture the compiler rejects.
    """
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value:
        return value, "$TORCH_CUDA_ARCH_LIST"
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        # As torch does: the visible GPUs, clamped to the newest architecture torch supports.
        supported = [int(a.split("_")[1]) for a in torch.cuda.get_arch_list()
                     if a.startswith("sm_") and a.split("_")[1].isdigit()]
        newest = max(((s // 10, s % 10) for s in supported), default=None)
        capabilities = set()
        for index in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(index)
            capabilities.add(min(capability, newest) if newest else capability)
        archs = [f"{major}.{minor}" for major, minor in sorted(capabilities)]
        archs[-1] += "+PTX"
        source = "the visible GPUs"
    else:
        archs = DEFAULT_ARCH_LIST.split(";")
        source = "default (no GPU visible)"
    by_nvcc = supported_archs(home) if home is not None else None
    if by_nvcc is not None:
        filtered = _filter_archs(archs, by_nvcc)
        if filtered != archs:
            source += f", limited to what nvcc supports ({', '.join(archs)} requested)"
        archs = filtered
    return ";".join(archs), source


# ------------------------------------------------------------------------------------ JIT build


def source_dir() -> Optional[Path]:
    """Where the kernel sources are: shipped in the package (``fisherforget/_csrc``, wheels) or
    the repository's ``csrc/`` (editable installs and source checkouts)."""
    package = Path(__file__).resolve().parents[2]  # fisherforget/backends/cuda/jit.py
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in SOURCES):
            return candidate
    return None


def cache_root() -> Path:
    configured = os.environ.get("FISHERFORGET_CUDA_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fisherforget"


def build_key(sources: Path, archs: str, cuda_version: str) -> str:
    """A digest of everything the build depends on: the sources, torch, CUDA, the archs."""
    import torch

    digest = hashlib.sha256()
    for path in sorted(p for p in sources.rglob("*") if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.relative_to(sources).as_posix().encode())
        digest.update(path.read_bytes())
    for part in (torch.__version__, cuda_version, archs, sys.version, str(EXTRA_CFLAGS),
                 str(EXTRA_CUDA_CFLAGS), str(link_flags())):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def jit_build_dir() -> Optional[Path]:
    """The cache folder a JIT build here would use, or None when it cannot be known yet."""
    sources = source_dir()
    home, _ = find_cuda_home()
    if sources is None or home is None:
        return None
    archs, _ = arch_list(home)
    return cache_root() / f"cuda-{build_key(sources, archs, nvcc_version(home) or '?')}"


def load_cached() -> Optional[Path]:
    """Load a finished JIT build of these sources for this toolkit and these archs from the cache,
    without running ninja or the compiler (so it never compiles); its folder, or None when there
    is none (or JIT builds are disabled)."""
    if os.environ.get("FISHERFORGET_CUDA_JIT", "1").strip() == "0":
        return None
    build_dir = jit_build_dir()
    library = None if build_dir is None else build_dir / f"{JIT_LIBRARY_NAME}.so"
    if library is None or not library.is_file():
        return None
    import torch

    torch.ops.load_library(str(library))
    return build_dir


def load(verbose: bool = False) -> Path:
    """Build (first use) or reuse the cached JIT build of ``csrc/`` and load it, registering
    ``torch.ops.fisherforget_C``. Returns the build folder; raises :class:`JitBuildError` saying
    what is missing (nvcc, ninja, a matching CUDA toolkit, the sources) or what failed."""
    if os.environ.get("FISHERFORGET_CUDA_JIT", "1").strip() == "0":
        raise JitBuildError("the JIT build is disabled (FISHERFORGET_CUDA_JIT=0)")
    import torch

    if torch.version.cuda is None:
        raise JitBuildError("torch was built without CUDA (torch.version.cuda is None)")
    sources = source_dir()
    if sources is None:
        raise JitBuildError(
            "the kernel sources (csrc/) are not installed next to the package; reinstall "
            "fisherforget from a wheel or a source checkout")
    home, how = find_cuda_home()
    if home is None:
        raise JitBuildError(f"nvcc was not found: {how}; install the CUDA toolkit or set CUDA_HOME")
    problem = version_problem(home)
    if problem is not None:
        raise JitBuildError(problem)
    if not ensure_ninja_on_path():
        raise JitBuildError("ninja is required for the JIT build: pip install ninja")
    use_cuda_home(home)  # before torch.utils.cpp_extension is imported: it reads CUDA_HOME once
    from torch.utils import cpp_extension

    archs, _ = arch_list(home)
    build_dir = cache_root() / f"cuda-{build_key(sources, archs, nvcc_version(home) or '?')}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{JIT_LIBRARY_NAME}.so").is_file():
        warnings.warn(f"fisherforget: compiling the CUDA kernels for {archs} into {build_dir} "
                      "(first use only; takes a few minutes)", stacklevel=2)
    previous_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        cpp_extension.load(
            name=JIT_LIBRARY_NAME,
            sources=[str(sources / name) for name in SOURCES],
            extra_include_paths=[str(sources)],
            extra_cflags=EXTRA_CFLAGS + [CUDA_DEFINE],
            extra_cuda_cflags=EXTRA_CUDA_CFLAGS,
            extra_ldflags=link_flags(),
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:
        raise JitBuildError(
            f"building csrc/ with nvcc from {home} into {build_dir} failed: {exc} "
            "(rerun with fisherforget.backends.cuda.jit.load(verbose=True) for the compiler log)"
        ) from exc
    finally:
        if previous_archs is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous_archs
    return build_dir
