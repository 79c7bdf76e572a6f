"""Build script. Package metadata lives here; the CUDA extension (csrc/) is added when available.

``fisherforget._C`` is compiled from ``csrc/`` when torch has CUDA and nvcc is found, also on a
machine without a GPU (then for ``TORCH_CUDA_ARCH_LIST``, default 8.0;9.0+PTX). Build with
``pip install --no-build-isolation .`` (or ``-e .``) so the installed torch is used.

``FISHERFORGET_CUDA=0`` skips the extension, ``FISHERFORGET_CUDA=1`` requires it (the install fails
instead of falling back to the pure-Python package); ``MAX_JOBS`` bounds parallel compile jobs.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _cuda_tools():
    """fisherforget/backends/cuda/jit.py, loaded by path (the package itself is not imported)."""
    path = ROOT / "fisherforget" / "backends" / "cuda" / "jit.py"
    spec = importlib.util.spec_from_file_location("_fisherforget_cuda_tools", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _builds_code() -> bool:
    # Metadata-only runs (egg_info, dist_info) need not repeat the message.
    return not all(arg in ("egg_info", "dist_info") or arg.startswith("-") or "/" in arg
                   for arg in sys.argv[1:])


def _cuda_extension():
    """``(ext_modules, cmdclass)`` for fisherforget._C, or ``([], {})`` saying why once."""
    mode = os.environ.get("FISHERFORGET_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"FISHERFORGET_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        reason = "FISHERFORGET_CUDA=0"
    else:
        reason = None
        tools = _cuda_tools()
        try:
            import torch
        except ImportError:
            torch = None
            reason = ("torch is not importable at build time (build with "
                      "`pip install --no-build-isolation .` after installing torch)")
        if reason is None and torch.version.cuda is None:
            reason = "torch was built without CUDA"
        if reason is None:
            home, how = tools.find_cuda_home()
            if home is None:
                reason = how
            else:
                reason = tools.version_problem(home)
    if reason is not None:
        if mode == "1":
            raise SystemExit(f"FISHERFORGET_CUDA=1 but fisherforget._C cannot be built: {reason}")
        if _builds_code():
            print(f"fisherforget: installing without the CUDA extension ({reason}); the 'cuda' "
                  "backend will try a JIT build on a GPU machine, else Triton or the reference "
                  "backend is used", file=sys.stderr)
        return [], {}

    tools.use_cuda_home(home)
    archs, arch_source = tools.arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    from torch.utils import cpp_extension

    if _builds_code():
        print(f"fisherforget: building fisherforget._C with CUDA {tools.nvcc_version(home)} from "
              f"{home} ({how}) for TORCH_CUDA_ARCH_LIST={archs} ({arch_source}), "
              f"MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}", file=sys.stderr)
    extension = cpp_extension.CUDAExtension(
        name="fisherforget._C",
        sources=[f"csrc/{name}" for name in tools.SOURCES],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": tools.EXTRA_CFLAGS, "nvcc": tools.EXTRA_CUDA_CFLAGS},
    )
    # ninja compiles the translation units in parallel (MAX_JOBS); without it, one at a time.
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=tools.ensure_ninja_on_path())
    return [extension], {"build_ext": build_ext}


class BuildPyWithKernelSources(build_py):
    """Also ship csrc/ as fisherforget/_csrc in wheels, for the JIT fallback of the cuda backend
    (editable installs find the repository's csrc/ directly)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "fisherforget" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((ROOT / "csrc").iterdir()):
            if source.suffix in (".cu", ".cuh", ".h", ".cpp"):
                shutil.copy2(source, target / source.name)


ext_modules, cmdclass = _cuda_extension()
cmdclass["build_py"] = BuildPyWithKernelSources

setup(
    name="fisherforget",
    version="0.1.0",
    description="Fisher-aware AdamW with fused Triton/CUDA kernels for graceful forgetting in LMs",
    long_description=open(ROOT / "README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The Triton kernels live in the top-level kernels/ folder and ship as fisherforget.kernels.
    packages=find_packages(include=["fisherforget", "fisherforget.*"]) + ["fisherforget.kernels"],
    package_dir={"fisherforget.kernels": "kernels"},
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton"],
        "transformers": ["transformers>=4.40", "accelerate"],
        "test": ["pytest", "hypothesis", "numpy", "ninja"],
    },
    entry_points={"console_scripts": ["fisherforget=fisherforget.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
