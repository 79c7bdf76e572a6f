#!/usr/bin/env bash
# The one prepared script for a GPU machine: build, test, benchmark, summarise, in < 8 minutes.
#
# Usage:  benchmarks/gpu_check.sh [OUT_DIR] [--dry-run]
#   OUT_DIR    where everything is written (default: $OUT, else ./gpu-check-results)
#   --dry-run  CPU rehearsal: the same stages and code paths at toy sizes (pip --dry-run, the
#              benchmarks with --tiny --device cpu); run it before spending GPU time.
# Environment:
#   PYTHON                   interpreter (default: python, else python3)
#   GPU_CHECK_BUDGET_S       wall-clock budget of the whole script (default 420 s)
#   FISHERFORGET_GIT_COMMIT  the commit to record when the tree has no .git
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST  passed to the extension build (defaults: all cores, this GPU)
#
# Expects torch with CUDA, triton, transformers, ninja and nvcc installed, and no package index:
# nothing is downloaded. Every stage runs under `timeout` within the remaining budget, logs to
# OUT_DIR/<stage>.log and is recorded in OUT_DIR/stages.tsv whatever happened before it. The last
# thing printed is a short table of the measured figures.

set -u

DRY_RUN=0
OUT_DIR=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
        *) OUT_DIR="$arg" ;;
    esac
done
OUT_DIR="${OUT_DIR:-${OUT:-gpu-check-results}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.." || exit 2
REPO="$(pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
STAGES="$OUT_DIR/stages.tsv"
BENCH_DIR="$OUT_DIR/bench"
START=$SECONDS
printf 'stage\trc\tseconds\tlimit_s\tnote\n' > "$STAGES"

if [ "$DRY_RUN" = 1 ]; then
    BENCH_SIZE=(--tiny --device cpu)
    PIP_DRY=(--dry-run)
    REQUIRE_EXTENSION=""
else
    BENCH_SIZE=()
    PIP_DRY=()
    # Make setup.py fail loudly when it cannot build fisherforget._C (instead of quietly
    # installing without it), so that the JIT stage below takes over and the log says why.
    REQUIRE_EXTENSION=1
fi
# The workloads of issue 5: the flat 2^28 tensor, the ~1B Llama set, 2,000 x 4,096 small tensors.
WORKLOADS="flat-2^28,llama-1b,many-small-2000x4096"

record() {  # stage rc seconds limit note
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STAGES"
}

# stage NAME CAP_S RESERVE_S COMMAND...: run COMMAND with a limit of CAP_S seconds, or less so
# that RESERVE_S seconds of the budget stay for the stages after it. Sets STAGE_RC.
stage() {
    local name="$1" cap="$2" reserve="$3"
    shift 3
    local left=$(( BUDGET - (SECONDS - START) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 5 ]; then
        echo "== [$name] skipped: the budget is spent"
        record "$name" "-" 0 "$limit" "skipped: budget spent"
        STAGE_RC=125
        return
    fi
    echo "== [$name] (limit ${limit}s) $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    STAGE_RC=$?
    local took=$(( SECONDS - t0 ))
    local note=""
    if [ "$STAGE_RC" = 124 ] || [ "$STAGE_RC" = 137 ]; then note="timed out"; fi
    if [ "$name" = pytest_cuda ] && [ "$STAGE_RC" = 5 ]; then
        note="no cuda-marked tests were collected"; STAGE_RC=0
    fi
    record "$name" "$STAGE_RC" "$took" "$limit" "$note"
    tail -n 4 "$OUT_DIR/$name.log" | sed 's/^/   | /'
    echo "   -> rc=$STAGE_RC in ${took}s"
}

# ---------------------------------------------------------------- 1. environment
# (doctor without a JIT build here: the extension is built in the next stages)
export PYTHON
stage env 60 360 bash -c '
    echo "date: $(date -u +%FT%TZ)"; echo "host: $(uname -a)"; echo "repo: $PWD"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo "no .git") ${FISHERFORGET_GIT_COMMIT:-}"
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "no nvidia-smi"; fi
    if command -v nvcc >/dev/null; then nvcc --version; else echo "no nvcc on PATH"; fi
    "$PYTHON" -c "import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available())"
    FISHERFORGET_CUDA_JIT=0 "$PYTHON" -m fisherforget doctor'

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    # Only this GPU's architecture: a build for every architecture would not fit the budget.
    ARCH_LIST="$("$PYTHON" -c 'import torch
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f"{major}.{minor}")' 2>/dev/null)"
    if [ -n "$ARCH_LIST" ]; then export TORCH_CUDA_ARCH_LIST="$ARCH_LIST"; fi
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# ---------------------------------------------------------------- 2. build the extension
stage build 220 250 env ${REQUIRE_EXTENSION:+FISHERFORGET_CUDA=1} \
    "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v \
    ${PIP_DRY[@]+"${PIP_DRY[@]}"} -e .
BUILD_RC=$STAGE_RC

# 3. does the extension import? If not, the JIT path (loading the cuda backend builds it).
stage extension_import 30 240 "$PYTHON" -c 'import fisherforget._C as ext; print("fisherforget._C:", ext.__file__)'
if [ "$STAGE_RC" != 0 ] || [ "$BUILD_RC" != 0 ]; then
    stage jit_build 180 230 "$PYTHON" -c 'import sys
from fisherforget import backends
usable = backends.load("cuda")
for name, why in backends.status().items():
    print(name, "available" if why is None else "unavailable: " + why)
sys.exit(0 if usable else 1)'
    if [ "$STAGE_RC" != 0 ]; then
        # Do not let every later process retry (and time out in) the same failed JIT build.
        export FISHERFORGET_CUDA_JIT=0
    fi
else
    record jit_build "-" 0 0 "not needed: the extension imports"
fi

# ---------------------------------------------------------------- 4. what works now
stage doctor 60 220 "$PYTHON" -m fisherforget doctor

# ---------------------------------------------------------------- 5. the GPU tests
stage pytest_cuda 110 150 "$PYTHON" -m pytest -m cuda -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT_DIR/pytest-cuda.xml"

# ---------------------------------------------------------------- 6. benchmarks
# Each bench gets its own stage and an internal budget below the stage's, so it finishes its
# files itself rather than being killed (its JSON is also rewritten after every row).
bench_stage() {  # name cap reserve bench-args...
    local name="$1" cap="$2" reserve="$3"
    shift 3
    local left=$(( BUDGET - (SECONDS - START) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    # Leave time for the imports (torch, triton, transformers) and for writing the files.
    local inner=$(( limit > 60 ? limit - 35 : limit / 2 ))
    stage "$name" "$cap" "$reserve" "$PYTHON" -m fisherforget bench "$@" \
        ${BENCH_SIZE[@]+"${BENCH_SIZE[@]}"} \
        --out "$BENCH_DIR" --time-budget "$inner"
}
bench_stage bench_step 170 75 step --workloads "$WORKLOADS" --dtypes fp32,bf16 \
    --op-variants --shapes-from transformers --target-seconds 0.3 --min-reps 5 --warmup 3
bench_stage bench_score 50 35 score --workloads "$WORKLOADS" --dtypes fp32,bf16 \
    --target-seconds 0.3 --min-reps 5 --warmup 3
bench_stage bench_estimate 40 15 estimate --workloads "$WORKLOADS" --dtypes fp32,bf16 \
    --target-seconds 0.3 --min-reps 5 --warmup 3

# ---------------------------------------------------------------- 7. summary (printed last)
stage summary 30 0 "$PYTHON" -m fisherforget bench --from-json "$BENCH_DIR"

echo
echo "== stages (budget ${BUDGET}s, used $(( SECONDS - START ))s; logs in $OUT_DIR)"
column -t -s $'\t' "$STAGES" 2>/dev/null || cat "$STAGES"
if [ -s "$OUT_DIR/pytest_cuda.log" ]; then
    echo "pytest: $(grep -E '(passed|failed|skipped|deselected|error|no tests ran)' "$OUT_DIR/pytest_cuda.log" | tail -n 1)"
fi
echo
if [ -s "$BENCH_DIR/summary.txt" ]; then
    cat "$BENCH_DIR/summary.txt"
else
    echo "no benchmark summary (see $OUT_DIR/bench_*.log)"
fi

# Exit status: 0 when every stage that must work did (the extension and JIT stages may fail on
# a machine without nvcc/GPU: the kernels are then measured through whichever backends load).
FAILED=$(awk -F'\t' 'NR > 1 && $1 != "extension_import" && $1 != "jit_build" && $2 != "0" && $2 != "-" {n++} END {print n + 0}' "$STAGES")
exit $(( FAILED > 0 ? 1 : 0 ))
