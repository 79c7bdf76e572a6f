"""Build script. Package metadata lives here; the compiled extension (csrc/) is added when it can be.

``fisherforget._C`` holds the native CPU kernels and, when torch has CUDA and nvcc is found, the
CUDA kernels too (also on a machine without a GPU: then for ``TORCH_CUDA_ARCH_LIST``, default
8.0;9.0+PTX limited to what nvcc supports). Without CUDA it is a CPU-only build. Build with
``pip install --no-build-isolation .`` (or ``-e .``) so the installed torch is used.

The extension is optional: when its compilation fails the install goes on, first retrying without
the CUDA kernels, then without the extension (the pure-Python reference backend remains).
``FISHERFORGET_CUDA=1`` requires the CUDA kernels (any failure aborts the install);
``FISHERFORGET_CUDA=0`` builds the CPU kernels only; ``MAX_JOBS`` bounds parallel compile jobs.
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


def _say(message: str) -> None:
    if _builds_code():
        print(f"fisherforget: {message}", file=sys.stderr)


def _cuda_mode() -> str:
    mode = os.environ.get("FISHERFORGET_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"FISHERFORGET_CUDA must be 0, 1 or unset, got {mode!r}")
    return mode


def _why_no_cuda(mode: str, torch, tools):
    """``(None, toolkit home, how found)`` when the CUDA kernels can be built, else ``(reason, ...)``."""
    if mode == "0":
        return "FISHERFORGET_CUDA=0", None, None
    if torch.version.cuda is None:
        return "torch was built without CUDA", None, None
    home, how = tools.find_cuda_home()
    if home is None:
        return how, None, None
    return tools.version_problem(home), home, how


def _extension():
    """``(ext_modules, cmdclass)`` for fisherforget._C, or ``([], {})`` saying why once."""
    mode = _cuda_mode()
    try:
        import torch
    except ImportError:
        reason = ("torch is not importable at build time (build with "
                  "`pip install --no-build-isolation .` after installing torch)")
        if mode == "1":
            raise SystemExit(f"FISHERFORGET_CUDA=1 but fisherforget._C cannot be built: {reason}")
        _say(f"installing without the compiled extension ({reason}); the reference backend "
             "(and Triton, where installed) will be used")
        return [], {}
    tools = _cuda_tools()
    reason, home, how = _why_no_cuda(mode, torch, tools)
    if reason is not None and mode == "1":
        raise SystemExit(f"FISHERFORGET_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    if reason is None:
        tools.use_cuda_home(home)
        archs, arch_source = tools.arch_list(home)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    from torch.utils import cpp_extension

    cpu_sources = [f"csrc/{name}" for name in tools.CPU_SOURCES]
    common = dict(name="fisherforget._C", include_dirs=[str(ROOT / "csrc")],
                  extra_link_args=tools.link_flags())
    if reason is None:
        _say(f"building fisherforget._C (CPU and CUDA kernels) with CUDA "
             f"{tools.nvcc_version(home)} from {home} ({how}) for TORCH_CUDA_ARCH_LIST={archs} "
             f"({arch_source}), MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}")
        extension = cpp_extension.CUDAExtension(
            sources=cpu_sources + [f"csrc/{name}" for name in tools.CUDA_SOURCES],
            extra_compile_args={"cxx": tools.EXTRA_CFLAGS + [tools.CUDA_DEFINE]
                                + tools.test_ops_flags(),
                                "nvcc": tools.EXTRA_CUDA_CFLAGS},
            **common,
        )
    else:
        _say(f"building fisherforget._C with the CPU kernels only ({reason}); the 'cuda' "
             "backend will try a JIT build on a GPU machine, else Triton or the reference "
             "backend is used on GPUs")
        extension = cpp_extension.CppExtension(
            sources=cpu_sources,
            extra_compile_args={"cxx": tools.EXTRA_CFLAGS + tools.test_ops_flags()}, **common)
    extension.fisherforget_with_cuda = reason is None
    extension.fisherforget_cpu_sources = cpu_sources
    # ninja compiles the translation units in parallel (MAX_JOBS); without it, one at a time.
    base = cpp_extension.BuildExtension.with_options(use_ninja=tools.ensure_ninja_on_path())
    return [extension], {"build_ext": _optional_build(base, required=mode == "1",
                                                      cuda_define=tools.CUDA_DEFINE)}


def _optional_build(base, required: bool, cuda_define: str):
    """``base`` (torch's BuildExtension), made to survive a failing compile unless ``required``:
    a CUDA build that fails is retried with the CPU kernels only, and a CPU-only build that fails
    leaves the package without the extension."""

    class OptionalBuildExtension(base):
        def build_extension(self, ext):
            try:
                return super().build_extension(ext)
            except Exception as exc:  # compiler errors surface as several distutils/ninja types
                if required:
                    raise
                first_error = exc
            if getattr(ext, "fisherforget_with_cuda", False):
                print(f"fisherforget: WARNING: building the CUDA kernels failed ({first_error}); "
                      "retrying with the CPU kernels only", file=sys.stderr)
                _drop_cuda(ext, cuda_define)
                try:
                    return super().build_extension(ext)
                except Exception as exc:
                    first_error = exc
            print(f"fisherforget: WARNING: building fisherforget._C failed ({first_error}); "
                  "installing without it (the reference backend will be used; see the compiler "
                  "output above)", file=sys.stderr)

    return OptionalBuildExtension


def _drop_cuda(ext, cuda_define: str) -> None:
    """Turns a CUDAExtension into its CPU-only variant, keeping the flags torch's BuildExtension
    added (ABI, extension name)."""
    ext.sources = list(ext.fisherforget_cpu_sources)
    if isinstance(ext.extra_compile_args, dict):
        ext.extra_compile_args.pop("nvcc", None)
        ext.extra_compile_args["cxx"] = [a for a in ext.extra_compile_args.get("cxx", [])
                                         if a != cuda_define]
    ext.libraries = [lib for lib in ext.libraries if not lib.startswith("cu")]
    ext.fisherforget_with_cuda = False


class BuildPyWithKernelSources(build_py):
    """Also ship csrc/ as fisherforget/_csrc in wheels, for the JIT fallback of the cuda backend
    (editable installs find the repository's csrc/ directly)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "fisherforget" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        csrc = ROOT / "csrc"
        for source in sorted(csrc.rglob("*")):
            if source.suffix in (".cu", ".cuh", ".h", ".cpp"):
                destination = target / source.relative_to(csrc)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination)


ext_modules, cmdclass = _extension()
cmdclass["build_py"] = BuildPyWithKernelSources

setup(
    name="fisherforget",
    version="0.1.0",
    description="Fisher-aware AdamW with fused Triton/CUDA kernels for graceful forgetting in LMs",
    long_description=open(ROOT / "README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The tested floor: CI runs the suite on Python 3.11 with two stacks, torch 2.14.1 / triton
    # 3.8.0 / transformers 5.24.0 (requirements-test.txt) and torch 2.11.0 / triton 3.6.0 /
    # transformers 5.17.0 (requirements-compat.txt, the GPU machines' stack, Python 3.12 there).
    python_requires=">=3.11",
    # The Triton kernels live in the top-level kernels/ folder and ship as fisherforget.kernels.
    packages=find_packages(include=["fisherforget", "fisherforget.*"]) + ["fisherforget.kernels"],
    package_dir={"fisherforget.kernels": "kernels"},
    install_requires=["torch>=2.11"],
    extras_require={
        "triton": ["triton>=3.6"],
        "transformers": ["transformers>=5.17", "accelerate"],
        "test": ["pytest", "hypothesis", "numpy", "ninja"],
    },
    entry_points={"console_scripts": ["fisherforget=fisherforget.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
