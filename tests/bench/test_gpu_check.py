"""benchmarks/gpu_check.sh: every stage runs and is recorded whatever failed before it, the
results always fit what a device run brings back (at most 8 files, 2 folders deep, 16 MiB
each), and they name the commit they were measured at.

The control flow is tested with a stand-in interpreter (seconds). The real CPU rehearsal
(``--dry-run``: pip --dry-run, the cuda tests collected, the benchmarks at toy sizes) takes a few
minutes on two shared cores; it runs when FISHERFORGET_TEST_GPU_CHECK=1.
"""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STAGES = ["env", "build", "extension_import", "jit_build", "doctor", "pytest_cuda",
          "bench_step", "bench_score", "bench_estimate", "summary", "output_check"]
OUTPUT_FILES = {"gpu-check.tar.gz", "stages.tsv", "pytest_cuda.log", "summary.txt", "step.json",
                "run.txt"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")

# Stands in for python: logs its arguments, fails where FAKE_FAIL says, writes the summary.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
case "$*" in
    *"pip install"*)
        echo "pip env FISHERFORGET_CUDA=${FISHERFORGET_CUDA:-unset}" >> "$FAKE_LOG"
        case "${FAKE_FAIL:-}" in build*) exit 1 ;; esac ;;
    *"import fisherforget._C"*) case "${FAKE_FAIL:-}" in build*) exit 1 ;; esac ;;
    *"fisherforget build"*) [ "${FAKE_FAIL:-}" = build_and_jit ] && exit 1; exit 0 ;;
    *"fisherforget doctor"*) echo "doctor JIT=${FISHERFORGET_CUDA_JIT:-unset}" >> "$FAKE_LOG" ;;
    *"import pytest_timeout"*) [ "${FAKE_FAIL:-}" = no_timeout_plugin ] && exit 1 ;;
    *"benchmarks step"*)
        echo "bench commit ${FISHERFORGET_GIT_COMMIT:-unset}" >> "$FAKE_LOG"
        [ "${FAKE_FAIL:-}" = bench_step ] && exit 3
        dir="${@: -3:1}"; mkdir -p "$dir"; echo '{"rows": []}' > "$dir/step.json"
        for i in 1 2 3 4 5 6 7 8 9 10; do echo "$i" > "$dir/extra$i.md"; done ;;
    *"pytest -m cuda"*)
        xml="$(printf '%s\n' "$@" | sed -n 's/^--junitxml=//p')"
        if [ "${FAKE_FAIL:-}" = pytest_hangs ]; then
            # As pytest does on Ctrl-C: stop, write the JUnit XML and the summary line.
            trap 'echo "<testsuite interrupted=1/>" > "$xml"; echo "== 1 passed in 9.9s =="; exit 2' INT
            sleep 60 & wait
        fi
        echo "<testsuite/>" > "$xml"; echo "== 3 passed, 1 deselected in 1.2s =="
        [ "${FAKE_FAIL:-}" = pytest ] && exit 1 ;;
    *"--from-json"*)
        dir="${@: -1}"; mkdir -p "$dir"; echo "FAKE SUMMARY TABLE" > "$dir/summary.txt" ;;
esac
exit 0
"""


def _run(tmp_path, fail=None, budget=None, extra=("--commit", COMMIT), script=SCRIPT,
         env_extra=None):
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = dict(os.environ, PYTHON=str(fake), FAKE_LOG=str(log))
    for name in ("OUT", "GPU_CHECK_COMMIT", "FISHERFORGET_GIT_COMMIT"):
        env.pop(name, None)
    env.update(env_extra or {})
    if fail:
        env["FAKE_FAIL"] = fail
    if budget is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(script), str(out), *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    stages_file = out / "stages.tsv"
    rows = ([line.split("\t") for line in stages_file.read_text().splitlines()[1:]]
            if stages_file.exists() else [])
    return proc, {r[0]: r for r in rows}, log.read_text().splitlines(), out


def _archive_members_of(archive):
    return {Path(m).as_posix().lstrip("./") for m in archive.getnames()} - {""}


def _archive_members(out):
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        return _archive_members_of(archive)


def test_all_stages_run_in_order_and_the_summary_is_printed_last(tmp_path):
    proc, stages, calls, out = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(stages) == STAGES
    assert stages["jit_build"][4] == "not needed: the extension imports"
    assert proc.stdout.rstrip().splitlines()[-1] == "FAKE SUMMARY TABLE"
    pip = next(c for c in calls if "pip install" in c)
    assert "--no-build-isolation --no-deps --no-index" in pip and pip.endswith("-e .")
    assert "--dry-run" not in pip
    assert "pip env FISHERFORGET_CUDA=1" in calls  # setup.py must build _C or fail loudly
    step = next(c for c in calls if "benchmarks step" in c)
    # Most valuable workload first; nothing the summary does not show (op variants, reference).
    assert "--workloads many-small-2000x4096,llama-1b,flat-2^28" in step
    assert "--op-variants" not in step and "--skip-variants reference" in step
    assert "/bench --time-budget" in step and "--tiny" not in step
    assert f"bench commit {COMMIT}" in calls
    assert any("benchmarks score" in c for c in calls)
    pytest_call = next(c for c in calls if "pytest -m cuda" in c)
    assert " -v " in pytest_call and "--timeout=60 --timeout-method=signal" in pytest_call
    assert ("--deselect tests/backends/test_cuda.py::test_gpu_jit_build_on_a_clean_cache"
            in pytest_call)
    assert "--durations=" in pytest_call and "--junitxml=" in pytest_call
    assert stages["pytest_cuda"][4] == "3 passed, 1 deselected in 1.2s"
    assert stages["output_check"][1] == "0", stages["output_check"]


def test_the_results_fit_what_a_device_run_brings_back(tmp_path):
    """At most 8 files, none deeper than 2 folders or over 16 MiB: the key files plus one
    archive of everything (here the fake step bench writes 11 files of its own)."""
    proc, stages, _, out = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.relative_to(out).as_posix() for p in files} == OUTPUT_FILES
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)
    members = _archive_members(out)
    for name in ("stages.tsv", "run.txt", "env.log", "build.log", "pytest_cuda.log",
                 "pytest-cuda.xml", "bench/step.json", "bench/extra10.md", "bench/summary.txt",
                 "bench_step.log", "summary.log"):
        assert name in members, (name, members)
    assert (out / "summary.txt").read_text() == "FAKE SUMMARY TABLE\n"
    run = (out / "run.txt").read_text()
    assert f"commit: {COMMIT}" in run and "output: 6 files (at most 8)" in run
    assert stages["output_check"][4].startswith("6 files (at most 8), 0 too deep")


def test_results_without_a_commit_are_refused(tmp_path):
    """A copy of the tree without .git (as on the device machine) needs --commit."""
    copy = tmp_path / "copy"
    (copy / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, copy / "benchmarks" / "gpu_check.sh")
    env = {"GIT_CEILING_DIRECTORIES": str(tmp_path)}
    proc, stages, calls, out = _run(tmp_path, extra=(), script=copy / "benchmarks" /
                                    "gpu_check.sh", env_extra=env)
    assert proc.returncode == 2 and "no commit to record" in proc.stderr
    assert not out.exists() and calls == []  # nothing ran, nothing was written
    proc, *_ = _run(tmp_path, extra=("--commit", "not-a-sha"),
                    script=copy / "benchmarks" / "gpu_check.sh", env_extra=env)
    assert proc.returncode == 2 and "is not a commit id" in proc.stderr
    proc, stages, calls, out = _run(tmp_path, extra=(), script=copy / "benchmarks" /
                                    "gpu_check.sh", env_extra=dict(env, GPU_CHECK_COMMIT="abc1234"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bench commit abc1234" in calls
    assert "commit: abc1234" in (out / "run.txt").read_text()


def test_a_full_out_dir_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.log").write_text("left over")
    proc, _, calls, _ = _run(tmp_path)
    assert proc.returncode == 2 and "is not empty" in proc.stderr and calls == []


def test_a_hanging_pytest_is_interrupted_and_still_leaves_its_report(tmp_path):
    """At the stage limit pytest gets SIGINT (it then writes its JUnit XML and summary), not
    SIGKILL; the stages after it still run."""
    proc, stages, _, out = _run(tmp_path, fail="pytest_hangs",
                                env_extra={"GPU_CHECK_PYTEST_S": "6"})
    row = stages["pytest_cuda"]
    assert row[1] == "124" and row[4].startswith("timed out; 1 passed in 9.9s"), row
    assert "pytest-cuda.xml" in _archive_members(out)
    assert stages["summary"][1] == "0"


def test_without_pytest_timeout_the_stage_says_so(tmp_path):
    _, stages, calls, _ = _run(tmp_path, fail="no_timeout_plugin")
    pytest_call = next(c for c in calls if "pytest -m cuda" in c)
    assert "--timeout" not in pytest_call
    assert "pytest-timeout absent" in stages["pytest_cuda"][4]


def test_a_failed_build_falls_back_to_jit_and_everything_after_still_runs(tmp_path):
    proc, stages, calls, _ = _run(tmp_path, fail="build")
    assert list(stages) == STAGES
    assert stages["build"][1] == "1" and stages["jit_build"][1] == "0"
    assert any("-m fisherforget build" in c for c in calls)
    assert all(stages[s][1] == "0" for s in STAGES[4:])
    assert proc.returncode == 1  # the build is a stage that must work
    assert [c for c in calls if c.startswith("doctor JIT=")] == ["doctor JIT=0",
                                                                  "doctor JIT=unset"]


def test_a_failed_jit_build_is_not_retried_by_later_stages(tmp_path):
    _, stages, calls, _ = _run(tmp_path, fail="build_and_jit")
    assert stages["jit_build"][1] == "1"
    doctors = [c for c in calls if c.startswith("doctor JIT=")]
    # The env stage never JIT-builds; after the JIT stage failed, nothing retries it.
    assert doctors == ["doctor JIT=0", "doctor JIT=0"]
    assert all(stages[s][1] == "0" for s in STAGES[4:])


def test_a_failed_benchmark_is_recorded_and_the_rest_still_run(tmp_path):
    proc, stages, _, _ = _run(tmp_path, fail="bench_step")
    assert stages["bench_step"][1] == "3"
    assert stages["bench_score"][1] == "0" and stages["summary"][1] == "0"
    assert proc.returncode == 1
    assert proc.stdout.rstrip().splitlines()[-1] == "FAKE SUMMARY TABLE"


def test_a_spent_budget_skips_stages_but_still_records_them(tmp_path):
    proc, stages, _, _ = _run(tmp_path, budget=0)
    assert list(stages) == STAGES
    assert all(stages[s][1] in ("-",) for s in STAGES if s not in ("jit_build", "output_check"))
    assert "no benchmark summary" in proc.stdout
    assert stages["output_check"][1] == "0"  # even then, the results fit


def test_dry_run_uses_pip_dry_run_and_toy_sizes_on_cpu(tmp_path):
    proc, stages, calls, _ = _run(tmp_path, extra=("--dry-run",))
    assert proc.returncode == 0
    assert "--dry-run" in next(c for c in calls if "pip install" in c)
    assert "pip env FISHERFORGET_CUDA=unset" in calls
    for bench in ("benchmarks step", "benchmarks score", "benchmarks estimate"):
        call = next(c for c in calls if bench in c)
        assert "--tiny --device cpu" in call
        assert "--skip-variants" not in call  # on a CPU the summary shows the reference


def test_unknown_option_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr


@pytest.mark.skipif(os.environ.get("FISHERFORGET_TEST_GPU_CHECK") != "1",
                    reason="the real CPU rehearsal takes minutes; "
                           "set FISHERFORGET_TEST_GPU_CHECK=1")
def test_real_dry_run_on_cpu(tmp_path):
    """The CPU rehearsal: every stage rc 0, and OUT holds only what a device run brings back."""
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    rows = {r.split("\t")[0]: r.split("\t")
            for r in (out / "stages.tsv").read_text().splitlines()[1:]}
    assert proc.returncode == 0, proc.stdout[-3000:]
    with tarfile.open(out / "gpu-check.tar.gz") as archive:
        for stage in ("env", "build", "doctor", "pytest_cuda", "bench_step", "bench_score",
                      "bench_estimate", "summary", "output_check"):
            if rows[stage][1] != "0" and stage != "output_check":
                log = archive.extractfile(f"./{stage}.log").read().decode()[-2000:]
                raise AssertionError((stage, rows[stage], log))
            assert rows[stage][1] == "0", rows[stage]
        members = _archive_members_of(archive)
    for name in ("step", "score", "estimate"):
        assert f"bench/{name}.json" in members
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == OUTPUT_FILES
    summary = (out / "summary.txt").read_text()
    assert "[step]" in summary and proc.stdout.rstrip().endswith(summary.rstrip())


def test_the_budget_fits_one_device_call_and_every_stage_runs():
    """The default budget and the device call's timeout_s are one documented pair (540 + 30 s to
    bring the results back = 570), and with a build of the measured ~150 s every stage still
    gets a limit (each stage's cap and reserve, simulated at its full limit)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = (root / "benchmarks" / "gpu_check.sh").read_text()
    budget = int(re.search(r'BUDGET="\$\{GPU_CHECK_BUDGET_S:-(\d+)\}"', script).group(1))
    pytest_cap = int(re.search(r'PYTEST_CAP="\$\{GPU_CHECK_PYTEST_S:-(\d+)\}"', script).group(1))
    assert budget + 30 == 570
    docs = (root / "docs" / "benchmarks.md").read_text()
    assert "timeout_s=570" in docs and "GPU_CHECK_BUDGET_S=540" in docs
    stages = []
    for line in script.splitlines():
        m = re.match(r'\s*(?:bench_)?stage (\w+) ("\$PYTEST_CAP"|\d+) (\d+) ', line)
        if m and m.group(1) not in ("jit_build",):  # the JIT stage runs only if the build failed
            cap = pytest_cap if m.group(2) == '"$PYTEST_CAP"' else int(m.group(2))
            stages.append((m.group(1), cap, int(m.group(3))))
    names = [s[0] for s in stages]
    assert names[:5] == ["env", "build", "extension_import", "doctor", "pytest_cuda"], names
    used = 0
    for name, cap, reserve in stages:
        limit = min(cap, budget - used - reserve)
        assert limit >= 5, f"{name} would be skipped (limit {limit})"
        used += 150 if name == "build" else limit
    assert used <= budget
