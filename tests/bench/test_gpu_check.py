"""benchmarks/gpu_check.sh: every stage runs and is recorded whatever failed before it.

The control flow is tested with a stand-in interpreter (seconds). The real CPU rehearsal
(``--dry-run``: pip --dry-run, the cuda tests collected, the benchmarks at toy sizes) takes a few
minutes on two shared cores; it runs when FISHERFORGET_TEST_GPU_CHECK=1.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STAGES = ["env", "build", "extension_import", "jit_build", "doctor", "pytest_cuda",
          "bench_step", "bench_score", "bench_estimate", "summary"]

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
    *"backends.load"*) [ "${FAKE_FAIL:-}" = build_and_jit ] && exit 1; exit 0 ;;
    *"fisherforget doctor"*) echo "doctor JIT=${FISHERFORGET_CUDA_JIT:-unset}" >> "$FAKE_LOG" ;;
    *"bench step"*) [ "${FAKE_FAIL:-}" = bench_step ] && exit 3 ;;
    *"pytest -m cuda"*) [ "${FAKE_FAIL:-}" = pytest ] && exit 1 ;;
    *"--from-json"*)
        dir="${@: -1}"; mkdir -p "$dir"; echo "FAKE SUMMARY TABLE" > "$dir/summary.txt" ;;
esac
exit 0
"""


def _run(tmp_path, fail=None, budget=None, extra=()):
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PYTHON=str(fake), FAKE_LOG=str(log))
    env.pop("OUT", None)
    if fail:
        env["FAKE_FAIL"] = fail
    if budget is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), str(out), *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    rows = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()[1:]]
    return proc, {r[0]: r for r in rows}, log.read_text().splitlines(), out


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
    step = next(c for c in calls if "bench step" in c)
    assert "--workloads flat-2^28,llama-1b,many-small-2000x4096" in step
    assert f"--out {out}/bench" in step and "--time-budget" in step and "--tiny" not in step
    assert any("bench score" in c for c in calls) and any("pytest -m cuda" in c for c in calls)


def test_a_failed_build_falls_back_to_jit_and_everything_after_still_runs(tmp_path):
    proc, stages, calls, _ = _run(tmp_path, fail="build")
    assert list(stages) == STAGES
    assert stages["build"][1] == "1" and stages["jit_build"][1] == "0"
    assert any("backends.load" in c for c in calls)
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
    assert all(stages[s][1] in ("-",) for s in STAGES if s != "jit_build")
    assert "no benchmark summary" in proc.stdout


def test_dry_run_uses_pip_dry_run_and_toy_sizes_on_cpu(tmp_path):
    proc, stages, calls, _ = _run(tmp_path, extra=("--dry-run",))
    assert proc.returncode == 0
    assert "--dry-run" in next(c for c in calls if "pip install" in c)
    assert "pip env FISHERFORGET_CUDA=unset" in calls
    for bench in ("bench step", "bench score", "bench estimate"):
        call = next(c for c in calls if bench in c)
        assert "--tiny --device cpu" in call


def test_unknown_option_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr


@pytest.mark.skipif(os.environ.get("FISHERFORGET_TEST_GPU_CHECK") != "1",
                    reason="the real CPU rehearsal takes minutes; "
                           "set FISHERFORGET_TEST_GPU_CHECK=1")
def test_real_dry_run_on_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    rows = {r.split("\t")[0]: r.split("\t")
            for r in (out / "stages.tsv").read_text().splitlines()[1:]}
    assert proc.returncode == 0, proc.stdout[-3000:]
    for stage in ("env", "build", "doctor", "pytest_cuda", "bench_step", "bench_score",
                  "bench_estimate", "summary"):
        assert rows[stage][1] == "0", (stage, (out / f"{stage}.log").read_text()[-2000:])
    for name in ("step", "score", "estimate"):
        assert (out / "bench" / f"{name}.json").exists()
    summary = (out / "bench" / "summary.txt").read_text()
    assert "[step]" in summary and proc.stdout.rstrip().endswith(summary.rstrip())
