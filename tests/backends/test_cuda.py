"""Tests of the CUDA backend: csrc/ (kernels + binding) and fisherforget/backends/cuda.py.

Without a GPU (CI):
* the extension is built by ``make test`` (``pip install -e .``) against the CUDA build of torch;
  it imports and registers the ops with the schemas the Python side expects (its native CPU
  kernels are tested in test_cpu.py);
* each torch-free ``.cu`` compiles with plain ``nvcc -c`` for sm_80 and sm_90;
* the launch geometry (tables, planner, compiled code) is tested in test_cuda_geometry.py;
* the kernels' own code runs on the host: the extension registers test-only ops
  (``fisherforget_C::emulated_*``) that execute the same per-thread code on CPU tensors one
  simulated thread at a time; the tests on device "cpu" route the CUDA glue to them. They are
  compared with the reference backend on fresh random inputs, so the math, the vector/scalar
  paths, the tables and the relaunches are tested here too.

With a GPU (``-m cuda``, the same comparisons on the device plus sizes up to 2^28 and 1,000
tensors, poisoned outputs, run-to-run determinism, CUDA-graph capture, the optimizer end to end and
a JIT build on a clean cache).
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import pytest
import torch

import fisherforget
from fisherforget import FisherAdamW, ops
from step_cases import (BUILD_INFO, CASES_BY_NAME, CPU_SIZES, CUDA_EMULATION, NO_EMULATION,
                        assert_close_ulp, cases_for, check_against_oracle, cuda_emulation,
                        check_against_reference, check_error, errors_for, make_grads,
                        make_hyper, make_inputs, make_scalars, replace_case, run_step, short_name)
from fisherforget.backends.cuda import ops as cuda_backend
from fisherforget.backends.cuda import jit as cuda_jit

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
HAS_GPU = torch.cuda.is_available()


def _build_expected() -> Optional[str]:
    """Why the extension need not exist here, or None when the build must have produced it."""
    if os.environ.get("FISHERFORGET_CUDA", "").strip() == "0":
        return "FISHERFORGET_CUDA=0"
    if torch.version.cuda is None:
        return "torch was built without CUDA"
    home, why = cuda_jit.find_cuda_home()
    if home is None:
        return why
    return cuda_jit.version_problem(home)


# Importing fisherforget._C registers torch.ops.fisherforget_C (in builds for the tests with the
# CUDA kernels, the fisherforget_C::emulated_* ops too).
_PREBUILT_ERROR = cuda_backend.load_prebuilt()
_KERNELS = BUILD_INFO.get("kernels", "").split(",") if _PREBUILT_ERROR is None else []


def _prebuilt_error() -> Optional[str]:
    return _PREBUILT_ERROR


# Where the build was expected but _C is missing, test_extension_is_built_where_it_can_be fails.
needs_extension = pytest.mark.skipif(
    _PREBUILT_ERROR is not None, reason=f"fisherforget._C does not import: {_PREBUILT_ERROR}"
)
# A CPU-only build (no nvcc at build time) has neither the CUDA kernels nor their emulation; a
# user's build (no FISHERFORGET_TEST_OPS=1) has the kernels but not the emulation.
needs_cuda_kernels = pytest.mark.skipif(
    not CUDA_EMULATION, reason=_PREBUILT_ERROR or NO_EMULATION)


@pytest.fixture(autouse=True)
def _cpu_tensors_run_the_emulation(request):
    """A test of the CUDA kernels on device "cpu" runs the host emulation of their per-thread
    code (step_cases.cuda_emulation)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("device") != "cpu" or not CUDA_EMULATION:
        yield
        return
    with cuda_emulation():
        yield

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATE_DTYPES = [torch.float32, torch.bfloat16]


# ----------------------------------------------------------------------------------- build checks


def test_extension_is_built_where_it_can_be():
    """`make test` builds _C with the CUDA kernels whenever torch has CUDA and nvcc exists: a
    missing _C, or a CPU-only one, is a failure."""
    why_not = _build_expected()
    if why_not is not None:
        pytest.skip(f"no CUDA build expected: {why_not}")
    assert _prebuilt_error() is None, f"fisherforget._C does not import: {_prebuilt_error()}"
    assert "cuda" in _KERNELS, torch.ops.fisherforget_C.build_info()


@needs_extension
@pytest.mark.parametrize("info, usable", [
    ("archs=800,900;cuda=13000;kernels=cpu,cuda;cpu_isa=avx2", True),
    ("archs=;cuda=0;kernels=cpu;cpu_isa=avx2", False),
    ("archs=800,900;cuda=13000", True),  # a build from before the kernels= field
])
def test_a_cpu_only_extension_makes_the_cuda_backend_unavailable(monkeypatch, info, usable):
    # Its fisherforget_C ops exist (CPU implementations only): on a GPU machine the backend must
    # say why it cannot run rather than fail at the first step.
    monkeypatch.setattr(torch.ops.fisherforget_C, "build_info", lambda: info)
    error = cuda_backend._kernels_error()
    assert (error is None) == usable
    if not usable:
        assert "CPU kernels only" in error and "FISHERFORGET_CUDA=1" in error


@needs_extension
def test_ops_are_registered_with_the_expected_schemas():
    assert _prebuilt_error() is None
    for op, schema in cuda_backend.SCHEMAS.items():
        assert str(getattr(torch.ops.fisherforget_C, op).default._schema) == schema
        if CUDA_EMULATION:  # the emulation takes the same arguments
            emulated = getattr(torch.ops.fisherforget_C, f"emulated_{op}").default._schema
            assert str(emulated) == schema.replace(f"::{op}(", f"::emulated_{op}(")
    if "cuda" not in _KERNELS:
        return
    info = cuda_backend.build_info()
    assert info["archs"].startswith("sm_"), info
    major = torch.version.cuda.split(".")[0]
    assert info["cuda"].split(".")[0] == major, info


NVCC_TORCH_FLAGS = [  # torch's CUDAExtension flags: the kernels must build under them
    "-std=c++17", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def test_kernel_files_compile_with_plain_nvcc(tmp_path):
    """Each .cu is torch-free: plain nvcc (no torch include path) compiles it for sm_80 and sm_90.

    -O1 for host and ptxas keeps this to about 40 s of CPU on two cores, two files at a time.
    """
    home, why = cuda_jit.find_cuda_home()
    if home is None:
        pytest.skip(f"nvcc not found: {why}")
    nvcc = str(Path(home) / "bin" / "nvcc")
    sources = sorted(CSRC.glob("*.cu"))
    assert {s.name for s in sources} == {s for s in cuda_jit.SOURCES if s.endswith(".cu")}

    def compile_one(source: Path) -> tuple[str, int, str]:
        command = [nvcc, *NVCC_TORCH_FLAGS, "-O1", "-Xptxas", "-O1", "-I", str(CSRC),
                   "-gencode", "arch=compute_80,code=sm_80",
                   "-gencode", "arch=compute_90,code=sm_90",
                   "-c", str(source), "-o", str(tmp_path / (source.stem + ".o"))]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        return source.name, result.returncode, result.stdout + result.stderr

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, sources))
    failed = {name: log[-3000:] for name, code, log in results if code != 0}
    assert not failed, failed
    warned = {name: log[-3000:] for name, _, log in results if "warning" in log.lower()}
    assert not warned, warned


# --------------------------------------------------------------------------- toolkit discovery, JIT


def test_cuda_home_found_through_a_wrapper_script(tmp_path, monkeypatch):
    home, _ = cuda_jit.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit here")
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    found, how = cuda_jit.find_cuda_home()
    assert found == str(Path(home).resolve())
    assert cuda_jit.toolkit_problem(str(tmp_path)) is not None  # the wrapper's folder is no toolkit


def test_invalid_cuda_home_is_reported_and_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    found, how = cuda_jit.find_cuda_home()
    if found is None:
        assert f"{tmp_path} has no bin/nvcc" in how
    else:
        assert found != str(tmp_path)


def test_cuda_version_mismatch_is_explained(monkeypatch):
    home, _ = cuda_jit.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit here")
    found = cuda_jit.nvcc_version(home)
    monkeypatch.setattr(torch.version, "cuda", f"{int(found.split('.')[0]) + 1}.0")
    problem = cuda_jit.version_problem(home)
    assert problem is not None and "CUDA version mismatch" in problem and found in problem


@pytest.mark.parametrize("case", ["disabled", "no_sources", "no_nvcc"])
def test_jit_build_errors_say_what_is_missing(case, monkeypatch):
    if torch.version.cuda is None:
        pytest.skip("torch without CUDA")
    if case == "disabled":
        monkeypatch.setenv("FISHERFORGET_CUDA_JIT", "0")
        expected = "FISHERFORGET_CUDA_JIT=0"
    elif case == "no_sources":
        monkeypatch.setattr(cuda_jit, "source_dir", lambda: None)
        expected = "kernel sources"
    else:
        monkeypatch.setattr(cuda_jit, "find_cuda_home", lambda: (None, "no nvcc on PATH"))
        expected = "nvcc was not found: no nvcc on PATH"
    with pytest.raises(cuda_jit.JitBuildError, match=expected):
        cuda_jit.load()


def test_jit_sources_and_cache_location(tmp_path, monkeypatch):
    # A source checkout (editable install) uses csrc/ itself; a regular install its copy.
    shipped = Path(cuda_jit.__file__).resolve().parents[2] / "_csrc"
    assert cuda_jit.source_dir() in (CSRC, shipped)
    assert all((cuda_jit.source_dir() / name).read_bytes() == (CSRC / name).read_bytes()
               for name in cuda_jit.SOURCES)
    monkeypatch.setenv("FISHERFORGET_CUDA_CACHE", str(tmp_path))
    assert cuda_jit.cache_root() == tmp_path
    build_dir = cuda_jit.jit_build_dir()
    if build_dir is not None:
        assert build_dir.parent == tmp_path and build_dir.name.startswith("cuda-")


@pytest.mark.skipif(not sys.platform.startswith("linux")
                    or not all(shutil.which(tool) for tool in ("g++", "readelf", "nm")),
                    reason="needs Linux, g++ and binutils")
def test_link_flags_keep_libstdcxx_shared_with_a_static_only_compiler(tmp_path):
    """The GPU image's g++ wrapper searches a folder with only libstdc++.a first: a library linked
    plainly gets a private libstdc++ (and _C crashed handing a str to torch). With link_flags()
    the library needs the libstdc++.so.6 torch loaded, and defines none of its symbols."""
    static = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True,
                            text=True).stdout.strip()
    if not os.path.isabs(static):
        pytest.skip("this g++ has no libstdc++.a")
    only_static = tmp_path / "gcc"
    only_static.mkdir()
    (only_static / "libstdc++.a").symlink_to(static)
    source = tmp_path / "strings.cpp"
    source.write_text("#include <sstream>\n#include <string>\n"
                      "std::string info() { std::ostringstream out; out << 1; "
                      "return out.str(); }\n")

    def link(name, flags):
        lib = tmp_path / name
        subprocess.run(["g++", f"-B{only_static}/", "-shared", "-fPIC", str(source), "-o", str(lib),
                        *flags], check=True, capture_output=True)
        needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
        exported = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                                  text=True).stdout
        return "libstdc++.so" in needed, "basic_ostringstream" in exported

    assert link("plain.so", []) == (False, True)  # the failure this guards against, reproduced
    flags = cuda_jit.link_flags()
    assert any(os.path.basename(f).startswith("libstdc++.so") for f in flags)
    assert link("fixed.so", flags) == (True, False)


def test_a_users_build_has_no_test_ops(monkeypatch):
    """The emulated_* ops and dry_run_fused_step are compiled only into builds for the tests: the
    define comes from FISHERFORGET_TEST_OPS=1 alone, and every place csrc/ registers them lies
    inside #ifdef FISHERFORGET_TEST_OPS."""
    monkeypatch.delenv("FISHERFORGET_TEST_OPS", raising=False)
    assert cuda_jit.test_ops_flags() == []
    monkeypatch.setenv("FISHERFORGET_TEST_OPS", "0")
    assert cuda_jit.test_ops_flags() == []
    monkeypatch.setenv("FISHERFORGET_TEST_OPS", "1")
    assert cuda_jit.test_ops_flags() == [cuda_jit.TEST_OPS_DEFINE]
    registrations = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in (".cpp", ".cu", ".h", ".cuh"):
            continue
        guards: list[bool] = []  # per open #if: whether it is the test-ops guard
        for number, line in enumerate(path.read_text().splitlines(), 1):
            directive = line.strip()
            if directive.startswith("#if"):
                guards.append(directive == "#ifdef FISHERFORGET_TEST_OPS")
            elif directive.startswith("#endif"):
                guards.pop()
            elif '"emulated_' in line or '"dry_run_fused_step' in line:
                registrations.append((path.name, number, any(guards)))
    assert len(registrations) >= 7, registrations  # 3 defs, 3 impls, 1 Python method
    assert all(guarded for _, _, guarded in registrations), registrations


def test_ninja_from_the_pip_package_is_put_on_path(monkeypatch):
    ninja = pytest.importorskip("ninja")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cuda_jit.ensure_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR


def test_load_library_reports_prebuilt_and_jit_failures(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_library_error", None)
    monkeypatch.setattr(cuda_backend, "_library_source", None)
    monkeypatch.setattr(cuda_backend, "_ops_registered", lambda: False)
    monkeypatch.setattr(cuda_backend, "load_prebuilt", lambda: "ImportError: no _C")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def failing_build():
        raise cuda_jit.JitBuildError("nvcc was not found")

    monkeypatch.setattr(cuda_jit, "load", failing_build)
    monkeypatch.setattr(cuda_backend, "_jit_tried", False)
    error = cuda_backend.load_library(build=True)
    assert "fisherforget._C is not built (ImportError: no _C)" in error
    assert "JIT build: nvcc was not found" in error


@pytest.mark.skipif(HAS_GPU, reason="checks the message given without a GPU")
def test_unavailable_without_gpu_says_why():
    error = cuda_backend.availability_error()
    assert error is not None
    assert "no CUDA GPU is visible" in error or "without CUDA" in error
    assert not cuda_backend.supports_device("cpu") and cuda_backend.supports_device("cuda")


@needs_extension
@pytest.mark.parametrize("capability, runs", [((8, 0), True), ((8, 9), True), ((9, 0), True),
                                              ((12, 0), True), ((7, 5), False)])
def test_gpu_architecture_check(capability, runs, monkeypatch):
    """The built archs must run on every visible GPU (a newer one via the highest arch's PTX)."""
    monkeypatch.setattr(cuda_backend, "_compiled_archs", lambda: [(8, 0), (9, 0)])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    error = cuda_backend._arch_error()
    if runs:
        assert error is None
    else:
        assert "built for sm_80, sm_90 but cuda:0 is sm_75" in error
        assert "TORCH_CUDA_ARCH_LIST=7.5" in error


@needs_cuda_kernels
def test_compiled_archs_come_from_the_binary():
    assert _prebuilt_error() is None
    assert cuda_backend._compiled_archs()  # e.g. [(8, 0), (9, 0)] from __CUDA_ARCH_LIST__


def test_setup_rejects_a_bad_switch_and_skips_when_told():
    env = dict(os.environ, FISHERFORGET_CUDA="maybe")
    bad = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "FISHERFORGET_CUDA must be 0, 1 or unset" in bad.stderr
    env["FISHERFORGET_CUDA"] = "0"
    skipped = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0 and skipped.stdout.strip().endswith("fisherforget")


@pytest.mark.parametrize("listed, requested, expected", [
    # CUDA 11.7 knows no sm_90: the default keeps sm_80 and puts the PTX there.
    ("compute_50 compute_80 compute_86", "8.0;9.0+PTX", "8.0+PTX"),
    ("compute_75 compute_80 compute_90 compute_100", "8.0;9.0+PTX", "8.0;9.0+PTX"),
    # Nothing requested is supported: the newest below the lowest request, else the oldest.
    ("compute_52 compute_61", "8.0;9.0+PTX", "6.1+PTX"),
    ("compute_100 compute_120", "8.0;9.0+PTX", "10.0+PTX"),
])
def test_default_arch_list_is_limited_to_what_nvcc_supports(tmp_path, monkeypatch, listed,
                                                              requested, expected):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n" + "".join(f"echo {a}\n" for a in listed.split()))
    nvcc.chmod(0o755)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(cuda_jit, "DEFAULT_ARCH_LIST", requested)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    archs, source = cuda_jit.arch_list(str(tmp_path))
    assert archs == expected
    assert ("limited to what nvcc supports" in source) == (expected != requested)
    # An explicit list is used as given; an nvcc that cannot list leaves the default alone.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert cuda_jit.arch_list(str(tmp_path)) == ("9.0", "$TORCH_CUDA_ARCH_LIST")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    nvcc.write_text("#!/bin/sh\nexit 1\n")
    assert cuda_jit.arch_list(str(tmp_path))[0] == requested


def test_doctor_reports_the_extension():
    from fisherforget import doctor

    report = doctor.report()["cuda_extension"]
    assert set(report) == {"prebuilt _C", "loaded", "JIT cache"}
    if "cuda" in _KERNELS:
        assert report["prebuilt _C"].startswith("built for sm_")
    elif _prebuilt_error() is None:
        assert report["prebuilt _C"].startswith("built with the CPU kernels only")
    else:
        assert report["prebuilt _C"].startswith("not built")


# ----------------------------------------------------------------------------------- input makers


def _fresh(shape, dtype, device, low=None, high=None, positive=False, scale=1.0):
    """Random, never-zero values."""
    if positive:
        values = torch.rand(shape, device=device) * (high - low) + low
    else:
        values = torch.randn(shape, device=device) * scale
        values = torch.where(values == 0, torch.full_like(values, 0.5 * scale), values)
    return values.to(dtype)


class StepInputs:
    """Lists for ops.fused_step on ``device``, fresh random values (never zeros)."""

    def __init__(self, sizes, device, param_dtype, state_dtype=torch.float32,
                 fisher_dtype=torch.float32, *, amsgrad=True, fisher=True, masks=True):
        shapes = [s if isinstance(s, tuple) else (s,) for s in sizes]
        self.params = [_fresh(s, param_dtype, device) for s in shapes]
        self.grads = [_fresh(s, param_dtype, device) for s in shapes]
        self.exp_avgs = [_fresh(s, state_dtype, device, scale=0.1) for s in shapes]
        self.exp_avg_sqs = [_fresh(s, state_dtype, device, 1e-4, 1e-2, positive=True)
                            for s in shapes]
        self.max_exp_avg_sqs = ([_fresh(s, state_dtype, device, 1e-4, 2e-2, positive=True)
                                 for s in shapes] if amsgrad else [])
        self.fishers = ([_fresh(s, fisher_dtype, device, 0.01, 1.0, positive=True) for s in shapes]
                        if fisher else [])
        # Some params masked, some not (None) in the same call.
        self.masks = [(torch.rand(s, device=device) > 0.3) if masks and i % 2 == 0 else None
                      for i, s in enumerate(shapes)]
        # Per-tensor step and Fisher counts that differ from tensor to tensor.
        self.steps = [torch.tensor(float(torch.randint(0, 20, ()).item()), device=device)
                      for _ in shapes]
        self.fisher_counts = ([torch.tensor(float(torch.randint(0, 6, ()).item()), device=device)
                               for _ in shapes] if fisher else [])

    LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "fishers", "masks",
             "steps", "fisher_counts")

    def lists(self):
        return [getattr(self, name) for name in self.LISTS]

    def clone(self) -> "StepInputs":
        twin = object.__new__(StepInputs)
        for name in self.LISTS:
            setattr(twin, name, [None if t is None else t.clone() for t in getattr(self, name)])
        return twin


def _tolerance(dtype: torch.dtype) -> float:
    # fp32: a few ulps (the reference's lerp/addcmul may round differently); bf16/fp16: 1 ulp.
    return 4 * torch.finfo(torch.float32).eps if dtype == torch.float32 else torch.finfo(dtype).eps


def assert_close_ulps(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    scale = torch.nan_to_num(e.abs(), nan=0.0).max()
    # Near-cancelling elements (p*decay - step*update) carry the rounding error of their operands,
    # which are up to the tensor's scale: hence the absolute term, in fp32 ulps of that scale.
    assert_close_ulp(actual, expected, 0, rel=_tolerance(expected.dtype),
                     terms=torch.maximum(a.abs(), e.abs()),
                     atol=scale * (4 * torch.finfo(torch.float32).eps), equal_nan=True, what=what)


def assert_step_matches(got: StepInputs, want: StepInputs, exact_fisher=False) -> None:
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "fishers"):
        for i, (a, e) in enumerate(zip(getattr(got, name), getattr(want, name))):
            if exact_fisher and name == "fishers":
                assert torch.equal(a, e), f"{name}[{i}]"
            else:
                assert_close_ulps(a, e, f"{name}[{i}]")
    for name in ("steps", "fisher_counts"):
        for i, (a, e) in enumerate(zip(getattr(got, name), getattr(want, name))):
            assert torch.equal(a, e), f"{name}[{i}]: {a.item()} vs {e.item()}"


def _table_inputs(name: str, shapes, device, **changes):
    """Case ``name`` of the shared table (tests/step_cases.py) with other shapes (and fields):
    its inputs as StepInputs and its arguments as run_step's keyword dict."""
    case = replace_case(CASES_BY_NAME[name], shapes=tuple(shapes), **changes)
    data, gen = make_inputs(case, device)
    data["grads"] = make_grads(case, gen, device)
    inputs = object.__new__(StepInputs)
    for key in StepInputs.LISTS:
        setattr(inputs, key, data[key])
    grad_scale, found_inf = make_scalars(case, device)
    hyper = make_hyper(case, device)
    kw = {f: getattr(hyper, f) for f in ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad",
                                         "maximize", "fisher_mode", "fisher_beta", "fisher_scale",
                                         "freeze_above", "freeze_below")}
    return inputs, dict(kw, grad_scale=grad_scale, found_inf=found_inf)


def _run_cuda_step(inputs: StepInputs, kw: dict) -> None:
    # On CPU tensors this runs the host emulation of the kernels through the same glue.
    kw = dict(kw)
    grad_scale, found_inf = kw.pop("grad_scale", None), kw.pop("found_inf", None)
    cuda_backend.fused_step(ops.StepTensors(*inputs.lists()), ops.StepHyper(**kw), grad_scale,
                            found_inf)


def _sizes(device):
    # Odd sizes, a multi-chunk tensor (chunks are 65536 elements) and, on the GPU, 2^20 + 3.
    return [1, 7, 4097, 65536 + 5] + ([2**20 + 3] if device == "cuda" else [])


# ------------------------------------------------------------------------------- fused_step tests
# The configurations are the shared table of tests/step_cases.py; on the GPU every case gets a
# tensor of 2^20 + 3 elements too.


def _compare(name, actual, expected, before):
    assert_close_ulps(actual, expected, name)


def _on(case, device):
    return case if device == "cpu" else replace_case(case, shapes=case.shapes + ((2**20 + 3,),))


@needs_cuda_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", cases_for("cuda"))
def test_step_cases_match_reference(device, case):
    # On CPU tensors this runs the host emulation of the kernels through the same glue.
    check_against_reference(_on(case, device), "cuda", _compare, device=device)


# (The emulation runs one simulated thread at a time: the cases of the CPU kernels' 70,001-element
# sizes, compared with the reference above, skip the oracle, which they meet on backend "cpu".)
@needs_cuda_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in cases_for("cuda") if c.values[0].shapes != CPU_SIZES])
def test_step_cases_match_float64_oracle(device, case):
    check_against_oracle(_on(case, device), "cuda", device=device)


@needs_cuda_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
def test_frozen_elements_keep_their_bits(device, param_dtype):
    """Frozen lanes inside a 16-byte packet are stored with their original bits (NaN poison in
    the state of masked-out elements survives), and fully frozen tensors are not touched."""
    want, kw = _table_inputs(f"ema_scale_mask_amsgrad-{short_name(param_dtype)}-fp32", [64, 4101],
                             device)
    for i, mask in enumerate(want.masks):
        if mask is not None:
            for state in (want.exp_avgs[i], want.exp_avg_sqs[i], want.max_exp_avg_sqs[i]):
                state[~mask] = float("nan")
    poisoned = [i for i, mask in enumerate(want.masks) if mask is not None]
    want.masks[1] = torch.zeros_like(want.params[1], dtype=torch.bool)
    got = want.clone()
    before = want.clone()
    run_step(want.lists(), kw, backend="reference")
    _run_cuda_step(got, kw)
    assert_step_matches(got, want)
    for i in poisoned:
        mask = got.masks[i]
        assert got.exp_avgs[i][~mask].isnan().all() and got.params[i][~mask].isfinite().all()
        assert not got.exp_avgs[i][mask].isnan().any()
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        assert torch.equal(getattr(got, name)[1], getattr(before, name)[1]), name


@needs_cuda_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_in_one_call(device):
    """More tensors than one kernel argument table holds (24), zero-size ones included: their
    step counts still advance, as in the reference."""
    count = 1000 if device == "cuda" else 70
    generator = torch.Generator().manual_seed(7)
    sizes = [int(torch.randint(0, 3000, (), generator=generator)) for _ in range(count)]
    sizes[3] = 0
    sizes[10] = 70000
    want, kw = _table_inputs("mean_thresholds_maximize_scaled-fp32-fp32", sizes, device)
    got = want.clone()
    run_step(want.lists(), kw, backend="reference")
    _run_cuda_step(got, kw)
    assert_step_matches(got, want)


@needs_cuda_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_and_noncontiguous_params(device):
    """A view at an odd storage offset takes the scalar path; a transposed param is stepped
    through a contiguous copy and written back; a mixed-dtype list is split by dtype."""
    want, kw = _table_inputs("ema_scale_mask_amsgrad-fp32-fp32", [(4099,), (33, 65), (300,)],
                             device)
    base = _fresh((4100,), torch.float32, device)
    want.params[0] = base[1:]  # contiguous, 4 bytes past a 16-byte boundary
    want.params[1] = _fresh((65, 33), torch.float32, device).t()  # non-contiguous
    want.params[2] = want.params[2].to(torch.bfloat16)
    want.grads[2] = want.grads[2].to(torch.bfloat16)
    got = want.clone()
    got.params[0] = base.clone()[1:]
    got.params[1] = want.params[1].t().clone().t()
    assert not got.params[1].is_contiguous()
    run_step(want.lists(), kw, backend="reference")
    _run_cuda_step(got, kw)
    assert_step_matches(got, want)


# ------------------------------------------------------------------------- fisher_accumulate/score


@needs_cuda_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fisher_dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("grad_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("scaled", [False, True])
def test_fisher_accumulate_matches_reference(device, fisher_dtype, grad_dtype, scaled):
    sizes = _sizes(device) + [2, 4096]
    want = [_fresh((n,), fisher_dtype, device, 0.01, 1.0, positive=True) for n in sizes]
    grads = [_fresh((n,), grad_dtype, device) for n in sizes]
    got = [f.clone() for f in want]
    scale = torch.tensor(4.0, device=device) if scaled else None
    alpha, beta = 0.9, 0.1 + 1e-3
    ops.fisher_accumulate(want, grads, alpha=alpha, beta=beta, grad_scale=scale,
                          backend="reference")
    cuda_backend.fisher_accumulate(got, grads, alpha=alpha, beta=beta, grad_scale=scale)
    for i, (a, e) in enumerate(zip(got, want)):
        assert_close_ulps(a, e, f"fishers[{i}]")


def _score_inputs(device, sizes, direction_dtype, grad_dtype, fisher_dtype):
    directions = [_fresh((n,), direction_dtype, device) for n in sizes]
    grads = [_fresh((n,), grad_dtype, device) for n in sizes]
    fishers = [_fresh((n,), fisher_dtype, device, 0.01, 1.0, positive=True) for n in sizes]
    return directions, grads, fishers


def _score_scale(directions, grads, fishers) -> torch.Tensor:
    """sum |d g| and sum F g^2 in float64: the magnitude a rounding error is relative to."""
    dot = sum((d.double() * g.double()).abs().sum() for d, g in zip(directions, grads))
    weighted = sum((f.double() * g.double() ** 2).sum() for f, g in zip(fishers, grads))
    return torch.stack([dot, weighted]).cpu()


@needs_cuda_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float16, torch.float32),
    (torch.float16, torch.float32, torch.bfloat16),
], ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
def test_fisher_score_matches_reference_and_is_deterministic(device, dtypes):
    sizes = _sizes(device) + [3] * 80  # > 64 tensors: several launches into one partial buffer
    directions, grads, fishers = _score_inputs(device, sizes, *dtypes)
    want = ops.fisher_score(directions, grads, fishers, backend="reference")
    got = cuda_backend.fisher_score(directions, grads, fishers)
    assert got.dtype == torch.float64 and got.shape == (2,) and got.device == grads[0].device
    bound = 1e-12 * _score_scale(directions, grads, fishers)
    assert ((got.cpu() - want.cpu()).abs() <= bound).all(), (got, want)
    again = cuda_backend.fisher_score(directions, grads, fishers)
    assert torch.equal(got, again)  # fixed-order reduction: bit for bit


@needs_cuda_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_fisher_score_mixed_dtypes_and_empty(device):
    directions, grads, fishers = _score_inputs(device, [5, 100], torch.float32, torch.float32,
                                               torch.float32)
    d2, g2, f2 = _score_inputs(device, [17, 0], torch.bfloat16, torch.float16, torch.bfloat16)
    directions, grads, fishers = directions + d2, grads + g2, fishers + f2
    want = ops.fisher_score(directions, grads, fishers, backend="reference")
    got = cuda_backend.fisher_score(directions, grads, fishers)
    bound = 1e-12 * _score_scale(directions, grads, fishers)
    assert ((got.cpu() - want.cpu()).abs() <= bound).all()
    assert torch.equal(cuda_backend.fisher_score([], [], []), torch.zeros(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------- errors


def _direct_step_args(device="cpu"):
    inputs = StepInputs([10], device, torch.float32, masks=False)
    kwargs = dict(lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                  amsgrad=True, maximize=False, fisher_mode="ema", fisher_beta=0.9,
                  fisher_scale=0.0, freeze_above=None, freeze_below=None, grad_scale=None,
                  found_inf=None)
    return inputs, kwargs


# The error inputs are the shared table of tests/step_cases.py.


@needs_cuda_kernels
def test_fused_step_steps_non_contiguous_tensors_through_copies():
    # The CUDA binding stages a strided tensor in a contiguous copy and writes it back (the
    # Python glue does no per-tensor work); the result equals the contiguous call's.
    inputs, kwargs = _direct_step_args()
    strided, contiguous = copy.deepcopy(inputs), copy.deepcopy(inputs)
    base = torch.zeros(20)
    base[::2] = strided.exp_avgs[0]
    strided.exp_avgs[0] = base[::2]
    assert not strided.exp_avgs[0].is_contiguous()
    torch.ops.fisherforget_C.emulated_fused_step(*strided.lists(), **kwargs)
    torch.ops.fisherforget_C.emulated_fused_step(*contiguous.lists(), **kwargs)
    for got, want in zip(strided.lists(), contiguous.lists()):
        for a, b in zip(got, want):
            if a is not None:
                assert torch.equal(a, b)
    assert torch.equal(base[1::2], torch.zeros(10))  # the gaps are untouched


@needs_cuda_kernels
@pytest.mark.parametrize("error, n, index", errors_for("cuda"))
def test_bad_step_input_is_refused_and_changes_nothing(error, n, index):
    # Through ops.fused_step on CPU tensors: the contract's checks, then the emulation's.
    check_error(error, "cuda", n, index)


@needs_cuda_kernels
@pytest.mark.parametrize("error, n, index", errors_for("cuda", "binding"))
def test_fused_step_errors_name_the_tensor(error, n, index):
    # The CUDA binding's checks, on CPU tensors through the emulation (the native CPU op shares
    # them: tests/backends/test_cpu.py).
    check_error(error, "cuda", n, index, call_binding=lambda lists, kwargs:
                torch.ops.fisherforget_C.emulated_fused_step(*lists, **kwargs))


@needs_cuda_kernels
def test_other_errors_name_the_problem():
    with pytest.raises(RuntimeError, match=r"grads has 1 tensors, expected 2 \(one per fisher\)"):
        torch.ops.fisherforget_C.emulated_fisher_accumulate(
            [torch.ones(3), torch.ones(3)], [torch.ones(3)], alpha=1.0, beta=1.0, grad_scale=None)
    with pytest.raises(TypeError, match=r"fishers\[0\] has dtype Half"):
        torch.ops.fisherforget_C.emulated_fisher_score([torch.ones(3)], [torch.ones(3)],
                                                       [torch.ones(3, dtype=torch.half)])
    if HAS_GPU:
        with pytest.raises(RuntimeError, match=r"grads\[0\] is on cpu but the tensors must all"):
            torch.ops.fisherforget_C.fisher_accumulate(
                [torch.ones(3, device="cuda")], [torch.ones(3)], alpha=1.0, beta=1.0,
                grad_scale=None)


# ---------------------------------------------------------------------- torch.library / compile


@needs_extension
def test_opcheck_schemas_and_fake_kernels():
    inputs, kwargs = _direct_step_args()
    kwargs["grad_scale"] = torch.tensor(2.0)
    torch.library.opcheck(torch.ops.fisherforget_C.fused_step.default,
                          tuple(inputs.lists()), kwargs)
    fishers, grads = [torch.rand(5), torch.rand(70)], [torch.randn(5), torch.randn(70)]
    torch.library.opcheck(torch.ops.fisherforget_C.fisher_accumulate.default, (fishers, grads),
                          dict(alpha=0.5, beta=0.5, grad_scale=None))
    torch.library.opcheck(torch.ops.fisherforget_C.fisher_score.default,
                          ([torch.randn(5)], [torch.randn(5)], [torch.rand(5)]))


@needs_extension
def test_torch_compile_traces_the_ops():
    want, kw = _table_inputs("ema_scale_mask_amsgrad-fp32-fp32", [9, 100], "cpu")
    got = want.clone()

    def step_and_score(inputs):
        _run_cuda_step(inputs, kw)
        return cuda_backend.fisher_score(inputs.exp_avgs, inputs.grads, inputs.fishers)

    expected = step_and_score(want)
    compiled = torch.compile(step_and_score, backend="aot_eager", fullgraph=True)
    result = compiled(got)
    assert_step_matches(got, want)
    assert torch.equal(result, expected)


# ------------------------------------------------------------------------------ GPU-only tests


@pytest.mark.cuda
@pytest.mark.slow
def test_gpu_fused_step_2_pow_28_elements():
    want, kw = _table_inputs("ema_scale_mask_amsgrad-bf16-fp32", [2**28], "cuda")
    got = want.clone()
    kw["amsgrad"] = False
    run_step(want.lists(), kw, backend="reference")
    run_step(got.lists(), kw, backend="cuda")
    assert_step_matches(got, want)
    del want, got
    torch.cuda.empty_cache()
    directions, grads, fishers = _score_inputs("cuda", [2**28], torch.float32, torch.bfloat16,
                                               torch.float32)
    expected = ops.fisher_score(directions, grads, fishers, backend="reference")
    result = ops.fisher_score(directions, grads, fishers, backend="cuda")
    bound = 1e-12 * _score_scale(directions, grads, fishers)
    assert ((result.cpu() - expected.cpu()).abs() <= bound).all()


@pytest.mark.cuda
def test_gpu_outputs_are_written_not_left_over():
    """Poison the caching allocator with NaN so an output the kernels fail to write shows up."""
    directions, grads, fishers = _score_inputs("cuda", [4097, 65536 * 3 + 1], torch.float32,
                                               torch.float32, torch.float32)
    expected = ops.fisher_score(directions, grads, fishers, backend="reference")
    for _ in range(3):
        # The op allocates its partial sums (2 per block) and output (2) from the small pool:
        # leave NaN-filled blocks of those sizes there for it to reuse.
        poison = [torch.full((n,), float("nan"), dtype=torch.float64, device="cuda")
                  for n in range(1, 65) for _ in range(4)]
        del poison
        result = ops.fisher_score(directions, grads, fishers, backend="cuda")
        assert torch.isfinite(result).all()
        bound = 1e-12 * _score_scale(directions, grads, fishers)
        assert ((result.cpu() - expected.cpu()).abs() <= bound).all()


@pytest.mark.cuda
def test_gpu_results_identical_run_to_run():
    first, kw = _table_inputs("mean_thresholds_maximize_scaled-bf16-bf16", [7, 4097, 2**20 + 3],
                              "cuda")
    second = first.clone()
    run_step(first.lists(), kw, backend="cuda")
    run_step(second.lists(), kw, backend="cuda")
    for name in StepInputs.LISTS:
        for a, b in zip(getattr(first, name), getattr(second, name)):
            assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.cuda
def test_gpu_cuda_graph_capture_of_a_step():
    """A captured step replays with device-side lr, grad_scale, found_inf and step counts: each
    replay sees the incremented counts and the lr value current at replay time."""
    want, kw = _table_inputs("mean_thresholds_maximize_scaled-fp32-fp32", [7, 4097, 65536 + 3],
                             "cuda")
    kw["lr"] = torch.tensor(3e-2, device="cuda")
    kw["found_inf"] = torch.tensor(0.0, device="cuda")
    got = want.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as for any capture
        scratch = want.clone()
        run_step(scratch.lists(), kw, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_step(got.lists(), kw, backend="cuda")
    for replay, (lr, skip) in enumerate([(3e-2, 0.0), (1e-2, 0.0), (1e-2, 1.0), (5e-3, 0.0)]):
        kw["lr"].fill_(lr)
        kw["found_inf"].fill_(skip)
        graph.replay()
        run_step(want.lists(), kw, backend="reference")
        torch.cuda.synchronize()
        assert_step_matches(got, want)
    assert got.steps[0].item() == want.steps[0].item()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_gpu_optimizer_end_to_end(dtype):
    """FisherAdamW(backend="cuda") follows backend="reference" over several steps."""
    torch.manual_seed(3)
    shapes = [(64, 33), (33,), (7, 5, 3), (1,)]
    ref_params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in shapes]
    cuda_params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    settings = dict(lr=1e-2, weight_decay=0.1, fisher="mean", fisher_scale=0.5, amsgrad=True,
                    freeze_above=5.0)
    optimizers = [FisherAdamW(ref_params, backend="reference", **settings),
                  FisherAdamW(cuda_params, backend="cuda", **settings)]
    optimizers[1].set_mask(cuda_params[0], torch.rand(shapes[0], device="cuda") > 0.5)
    optimizers[0].set_mask(ref_params[0], optimizers[1].state[cuda_params[0]]["mask"].clone())
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "fisher", "step", "fisher_count")
    for step in range(5):
        grads = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
        for params, opt in zip((ref_params, cuda_params), optimizers):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        for i, (a, e) in enumerate(zip(cuda_params, ref_params)):
            assert_close_ulps(a.detach(), e.detach(), f"step {step} param {i}")
            for key in keys:
                assert_close_ulps(optimizers[1].state[a][key], optimizers[0].state[e][key],
                                  f"step {step} param {i} {key}")
            # Continue from identical values, so rounding differences do not compound.
            with torch.no_grad():
                a.copy_(e)
                for key in keys:
                    optimizers[1].state[a][key].copy_(optimizers[0].state[e][key])


@pytest.mark.cuda
@pytest.mark.slow
def test_gpu_jit_build_on_a_clean_cache(tmp_path):
    """Where no prebuilt _C exists: build csrc/ with ninja into an empty cache and run an op."""
    script = textwrap.dedent("""
        import torch
        from fisherforget import ops
        from fisherforget.backends.cuda import jit as cuda_jit
        build_dir = cuda_jit.load()
        print("built in", build_dir)
        info = torch.ops.fisherforget_C.build_info()
        major, minor = torch.cuda.get_device_capability()
        assert f"{major}{minor}0" in info, info
        fishers = [torch.rand(n, device="cuda") + 0.01 for n in (1, 7, 4097)]
        grads = [torch.randn(n, device="cuda") for n in (1, 7, 4097)]
        want = [f.clone() for f in fishers]
        ops.fisher_accumulate(want, grads, alpha=0.9, beta=0.1, backend="reference")
        torch.ops.fisherforget_C.fisher_accumulate(fishers, grads, alpha=0.9, beta=0.1,
                                                   grad_scale=None)
        for a, e in zip(fishers, want):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=0)
        print("JIT OK")
    """)
    env = dict(os.environ, FISHERFORGET_CUDA_CACHE=str(tmp_path / "cache"),
               MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)),
               PYTHONPATH=os.pathsep.join([str(Path(fisherforget.__file__).resolve().parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0 and "JIT OK" in result.stdout, result.stdout + result.stderr
    assert any((tmp_path / "cache").glob(f"cuda-*/{cuda_jit.JIT_LIBRARY_NAME}.so"))


@pytest.fixture
def fresh_cuda_backend(monkeypatch):
    """The CUDA backend as on a GPU machine without a prebuilt fisherforget._C: nothing loaded
    yet, a GPU visible, the import of _C failing; ``builds`` records every JIT build."""
    from fisherforget import backends

    builds = []
    for name, value in (("_library_error", None), ("_library_source", None),
                        ("_jit_tried", False)):
        monkeypatch.setattr(cuda_backend, name, value)
    monkeypatch.setattr(cuda_backend, "_ops_registered", lambda: False)
    monkeypatch.setattr(cuda_backend, "load_prebuilt", lambda: "ImportError: no _C")
    monkeypatch.setattr(cuda_backend, "_register_fakes", lambda: None)
    monkeypatch.setattr(cuda_backend, "_kernels_error", lambda: None)
    monkeypatch.setattr(cuda_backend, "_arch_error", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(cuda_jit, "load", lambda: builds.append(1) or Path("/cache/cuda-x"))
    monkeypatch.setattr(cuda_jit, "load_cached", lambda: None)
    for table in (backends._loaded, backends._errors):
        monkeypatch.setitem(table, "cuda", None)
        del table["cuda"]
    monkeypatch.setattr(backends, "_build_tried", set())
    return builds


def test_auto_never_compiles_and_an_explicit_cuda_backend_builds_once(fresh_cuda_backend):
    from fisherforget import backends

    assert not backends.load("cuda")  # what auto asks
    assert fresh_cuda_backend == []
    assert "backend 'auto' never compiles: run `fisherforget build` once" in \
        backends.unavailable_reason("cuda")
    assert backends.load("cuda", build=True)  # what backend="cuda" asks: a JIT build
    assert fresh_cuda_backend == [1]
    assert cuda_backend.library_source() == "JIT build in /cache/cuda-x"
    assert backends.load("cuda") and backends.unavailable_reason("cuda") is None
    assert fresh_cuda_backend == [1]


def test_auto_loads_a_finished_jit_build_from_the_cache(fresh_cuda_backend, monkeypatch,
                                                         tmp_path):
    from fisherforget import backends

    monkeypatch.setattr(cuda_jit, "load_cached", lambda: tmp_path)
    assert backends.load("cuda") and fresh_cuda_backend == []
    assert cuda_backend.library_source() == f"cached JIT build in {tmp_path}"


def test_a_cached_jit_build_is_loaded_without_ninja(tmp_path, monkeypatch):
    """load_cached loads the library file itself: no build step can run from it."""
    loaded = []
    monkeypatch.setattr(cuda_jit, "jit_build_dir", lambda: tmp_path)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    assert cuda_jit.load_cached() is None  # nothing built yet
    (tmp_path / f"{cuda_jit.JIT_LIBRARY_NAME}.so").write_bytes(b"")
    assert cuda_jit.load_cached() == tmp_path
    assert loaded == [str(tmp_path / f"{cuda_jit.JIT_LIBRARY_NAME}.so")]
    monkeypatch.setenv("FISHERFORGET_CUDA_JIT", "0")
    assert cuda_jit.load_cached() is None


def test_fisherforget_build_says_what_it_did_or_what_is_missing(fresh_cuda_backend, monkeypatch,
                                                                  capsys):
    from fisherforget import cli

    monkeypatch.setattr(cuda_backend, "build_info", lambda: {"archs": "sm_90", "cuda": "13.0"})
    assert cli.main(["build"]) == 0
    assert "the CUDA kernels are ready: JIT build in /cache/cuda-x (archs sm_90, CUDA 13.0)" in \
        capsys.readouterr().out
    monkeypatch.setattr(cuda_backend, "_library_source", None)
    monkeypatch.setattr(cuda_backend, "_jit_tried", False)

    def missing():
        raise cuda_jit.JitBuildError("nvcc was not found: no nvcc on PATH")

    monkeypatch.setattr(cuda_jit, "load", missing)
    assert cli.main(["build"]) == 1
    assert "JIT build: nvcc was not found: no nvcc on PATH" in capsys.readouterr().err
