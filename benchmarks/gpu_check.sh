#!/usr/bin/env bash
# The one prepared script for a GPU machine: build, test, benchmark, summarise, in one device
# call: run it with the device tool's timeout_s=570 and the default budget of 540 s (the pair:
# the last 30 s are for the results under $OUT to come back).
#
# Usage:  benchmarks/gpu_check.sh [--commit SHA] [--dry-run] [OUT_DIR]
#   OUT_DIR       where the results go (default: $OUT, else ./gpu-check-results); must be empty
#   --commit SHA  the commit this tree is (required when the tree has no .git, as on the device
#                 machine, whose copy of the repository has none; also GPU_CHECK_COMMIT)
#   --dry-run     CPU rehearsal: the same stages and code paths at toy sizes (pip --dry-run, the
#                 benchmarks with --tiny --device cpu); run it before spending GPU time.
# Environment:
#   PYTHON               interpreter (default: python if it imports torch, else python3)
#   GPU_CHECK_COMMIT     as --commit (FISHERFORGET_GIT_COMMIT is accepted too)
#   GPU_CHECK_BUDGET_S   wall-clock budget of the whole script (default 540 s: a device call
#                        of timeout_s=570 minus 30 s to bring the results back)
#   GPU_CHECK_PYTEST_S   cap of the pytest stage (default 240 s); GPU_CHECK_TEST_TIMEOUT_S:
#                        per-test timeout (default 60 s, needs pytest-timeout)
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST  passed to the extension build (defaults: all cores, this GPU)
#
# Output contract (what a device run can bring back: at most 8 files, at most 2 folders deep,
# at most 16 MiB each): OUT_DIR holds exactly
#   gpu-check.tar.gz  every log, the JUnit XML, the benchmark JSON/markdown/plots, the tables
#   stages.tsv        one row per stage: rc, seconds, limit, note
#   pytest_cuda.log   the `pytest -m cuda -v` log (per-test results and durations)
#   summary.txt       the benchmark summary table
#   step.json         the step benchmark's full results
#   run.txt           commit, date, interpreter, budget, the output check
# They are rewritten after every stage, so a run cut short still leaves its evidence; the last
# stage checks the contract on OUT_DIR itself.
#
# Expects torch with CUDA, triton, transformers, ninja and nvcc, and no package index: nothing
# is downloaded. Every stage runs under `timeout` within the remaining budget and is recorded in
# stages.tsv whatever happened before it. The last thing printed is the benchmark summary.

set -u

usage() { sed -n '2,32p' "$0"; }

DRY_RUN=0
OUT_DIR=""
COMMIT="${GPU_CHECK_COMMIT:-${FISHERFORGET_GIT_COMMIT:-}}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --commit) [ $# -ge 2 ] || { echo "gpu_check.sh: --commit needs a value" >&2; exit 2; }
                  COMMIT="$2"; shift ;;
        --commit=*) COMMIT="${1#--commit=}" ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
        *) OUT_DIR="$1" ;;
    esac
    shift
done

cd "$(dirname "$0")/.." || exit 2
REPO="$(pwd)"
GIT_HEAD="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || true)"
if [ -z "$COMMIT" ]; then COMMIT="$GIT_HEAD"; fi
# Results that cannot be tied to a commit are worthless: refuse before spending device time.
if [ -z "$COMMIT" ]; then
    echo "gpu_check.sh: no commit to record: this tree has no .git; pass --commit SHA" \
         "(or set GPU_CHECK_COMMIT) for the commit the tree was copied from" >&2
    exit 2
fi
if ! printf '%s' "$COMMIT" | grep -Eq '^[0-9a-fA-F]{7,40}$'; then
    echo "gpu_check.sh: --commit '$COMMIT' is not a commit id (7 to 40 hex digits)" >&2
    exit 2
fi
export FISHERFORGET_GIT_COMMIT="$COMMIT"  # recorded by the benchmarks (bench/environment.py)

OUT_DIR="${OUT_DIR:-${OUT:-gpu-check-results}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [ -n "$(ls -A "$OUT_DIR")" ]; then
    # Leftovers would count against the 8 files a device run brings back.
    echo "gpu_check.sh: $OUT_DIR is not empty; give an empty or new folder" >&2
    exit 2
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
    # The device machine's torch lives in python3; a bare `python` may be another interpreter.
    if command -v python >/dev/null 2>&1 && python -c 'import torch' >/dev/null 2>&1; then
        PYTHON=python
    else
        PYTHON=python3
    fi
fi
export PYTHON
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
PYTEST_CAP="${GPU_CHECK_PYTEST_S:-240}"
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT_S:-60}"
STAGES="$WORK/stages.tsv"
BENCH_DIR="$WORK/bench"
START=$SECONDS
printf 'stage\trc\tseconds\tlimit_s\tnote\n' > "$STAGES"
{
    echo "commit: $COMMIT"
    echo "git HEAD of the tree: ${GIT_HEAD:-none (no .git)}"
    echo "started: $(date -u +%FT%TZ)"
    echo "python: $PYTHON ($(command -v "$PYTHON" || echo 'not found'))"
    echo "budget: ${BUDGET}s; dry run: $DRY_RUN"
} > "$WORK/run.txt"

if [ "$DRY_RUN" = 1 ]; then
    BENCH_SIZE=(--tiny --device cpu)
    # On a CPU no kernel runs, and the summary shows the reference backend: keep it.
    BENCH_DROP=()
    PIP_DRY=(--dry-run)
    REQUIRE_EXTENSION=""
else
    BENCH_SIZE=()
    # The reference backend is a slow ground truth that the summary shows only where no kernel
    # ran: on a GPU its rows would only spend the budget.
    BENCH_DROP=(--skip-variants reference)
    PIP_DRY=()
    # Make setup.py fail loudly when it cannot build fisherforget._C (instead of quietly
    # installing without it), so that the JIT stage below takes over and the log says why.
    REQUIRE_EXTENSION=1
fi
# Most valuable first (a spent budget skips the rows at the end): 2,000 x 4,096 small tensors
# (launch overhead), the ~1B Llama set, then the flat 2^28 tensor (peak bandwidth).
WORKLOADS="many-small-2000x4096,llama-1b,flat-2^28"

LIMIT_BYTES=$(( 16 * 1024 * 1024 ))
# copy_capped SRC DEST: copy, keeping only the end of a file over the per-file limit.
copy_capped() {
    [ -f "$1" ] || return 0
    if [ "$(wc -c < "$1")" -gt "$LIMIT_BYTES" ]; then
        { echo "[first part cut: over 16 MiB]"; tail -c $(( LIMIT_BYTES - 4096 )) "$1"; } > "$2"
    else
        cp "$1" "$2"
    fi
}

# Rewrites OUT_DIR from WORK: the key files and one archive of everything.
publish() {
    copy_capped "$STAGES" "$OUT_DIR/stages.tsv"
    copy_capped "$WORK/run.txt" "$OUT_DIR/run.txt"
    copy_capped "$WORK/pytest_cuda.log" "$OUT_DIR/pytest_cuda.log"
    copy_capped "$BENCH_DIR/summary.txt" "$OUT_DIR/summary.txt"
    copy_capped "$BENCH_DIR/step.json" "$OUT_DIR/step.json"
    tar -czf "$WORK/archive.tmp" -C "$WORK" --exclude=archive.tmp . 2>/dev/null
    if [ "$(wc -c < "$WORK/archive.tmp")" -gt "$LIMIT_BYTES" ]; then
        # Plots are the first to go (the JSON holds their numbers), then the logs' beginnings.
        tar -czf "$WORK/archive.tmp" -C "$WORK" --exclude=archive.tmp --exclude='*.png' . \
            2>/dev/null
    fi
    mv -f "$WORK/archive.tmp" "$OUT_DIR/gpu-check.tar.gz"
}

record() {  # stage rc seconds limit note
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STAGES"
}

# stage NAME CAP_S RESERVE_S COMMAND...: run COMMAND with a limit of CAP_S seconds, or less so
# that RESERVE_S seconds of the budget stay for the stages after it. Sets STAGE_RC. STAGE_SIGNAL
# (default TERM) is what `timeout` sends first; STAGE_NOTE is added to the stage's note.
STAGE_SIGNAL=TERM
STAGE_NOTE=""
stage() {
    local name="$1" cap="$2" reserve="$3"
    shift 3
    local left=$(( BUDGET - (SECONDS - START) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 5 ]; then
        echo "== [$name] skipped: the budget is spent"
        record "$name" "-" 0 "$limit" "skipped: budget spent"
        STAGE_RC=125
        publish
        return
    fi
    echo "== [$name] (limit ${limit}s) $*"
    local t0=$SECONDS
    timeout -s "$STAGE_SIGNAL" -k 15 "$limit" "$@" > "$WORK/$name.log" 2>&1
    STAGE_RC=$?
    local took=$(( SECONDS - t0 ))
    local note="$STAGE_NOTE"
    if [ "$name" = pytest_cuda ]; then
        # pytest's own last line ("12 passed, 3 skipped in 71.2s"): the measured test time.
        local summary
        summary="$(grep -E '^=+ .*(passed|failed|skipped|deselected|error|no tests ran).* =+$' \
                   "$WORK/$name.log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')"
        note="${summary:-no pytest summary line}${note:+; $note}"
        if [ "$STAGE_RC" = 5 ]; then
            note="no cuda-marked tests were collected; $note"; STAGE_RC=0
        fi
    fi
    if [ "$STAGE_RC" = 124 ] || [ "$STAGE_RC" = 137 ] || [ "$took" -ge "$limit" ]; then
        note="timed out${note:+; $note}"
    fi
    record "$name" "$STAGE_RC" "$took" "$limit" "$note"
    tail -n 4 "$WORK/$name.log" | sed 's/^/   | /'
    echo "   -> rc=$STAGE_RC in ${took}s"
    publish
}

# ---------------------------------------------------------------- 1. environment
# (doctor without a JIT build here: the extension is built in the next stages). No reserve: the
# stage is capped at 40 s and says what machine this was, also when a caller gives a small budget.
stage env 40 0 bash -c '
    echo "date: $(date -u +%FT%TZ)"; echo "host: $(uname -a)"; echo "repo: $PWD"
    echo "commit: $FISHERFORGET_GIT_COMMIT (git HEAD: $(git rev-parse HEAD 2>/dev/null || echo "no .git"))"
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
stage build 240 300 env ${REQUIRE_EXTENSION:+FISHERFORGET_CUDA=1} FISHERFORGET_TEST_OPS=1 \
    "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v \
    ${PIP_DRY[@]+"${PIP_DRY[@]}"} -e .
BUILD_RC=$STAGE_RC

# 3. does the extension import? If not, the JIT path (`fisherforget build`: backend 'auto' never
# compiles, so the build is asked for here, once).
stage extension_import 20 280 "$PYTHON" -c 'import fisherforget._C as ext; print("fisherforget._C:", ext.__file__)'
if [ "$STAGE_RC" != 0 ] || [ "$BUILD_RC" != 0 ]; then
    stage jit_build 180 280 "$PYTHON" -m fisherforget build
    if [ "$STAGE_RC" != 0 ]; then
        # Do not let every later process retry (and time out in) the same failed JIT build.
        export FISHERFORGET_CUDA_JIT=0
    fi
else
    record jit_build "-" 0 0 "not needed: the extension imports"
fi

# ---------------------------------------------------------------- 4. what works now
stage doctor 30 260 "$PYTHON" -m fisherforget doctor

# ---------------------------------------------------------------- 5. the GPU tests
# -v names every test in the log; a per-test timeout (signal method: the test fails, pytest goes
# on) and SIGINT at the stage limit (pytest stops and still writes its JUnit XML and summary)
# keep a hang attributable. test_gpu_jit_build_on_a_clean_cache repeats the JIT stage above (a
# full nvcc rebuild): deselected. The durations table is the measurement to budget this stage by.
# --continue-on-collection-errors: one module that fails to import must not cost the rest.
PYTEST_ARGS=(-m cuda -v -rfEs -p no:cacheprovider --continue-on-collection-errors --durations=40 --durations-min=0.5
             --deselect tests/backends/test_cuda.py::test_gpu_jit_build_on_a_clean_cache
             --junitxml="$WORK/pytest-cuda.xml")
if "$PYTHON" -c 'import pytest_timeout' >/dev/null 2>&1; then
    PYTEST_ARGS+=(--timeout="$TEST_TIMEOUT" --timeout-method=signal)
    STAGE_NOTE=""
else
    STAGE_NOTE="pytest-timeout absent: no per-test timeout"
fi
STAGE_SIGNAL=INT
stage pytest_cuda "$PYTEST_CAP" 100 "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" tests
STAGE_SIGNAL=TERM
STAGE_NOTE=""
PYTEST_LINE="$(awk -F'\t' '$1 == "pytest_cuda" {print $5}' "$STAGES")"
echo "pytest: ${PYTEST_LINE:-no summary line}" >> "$WORK/run.txt"

# ---------------------------------------------------------------- 6. benchmarks
# Each bench gets its own stage and an internal budget below the stage's, so it finishes its
# files itself rather than being killed (its JSON is also rewritten after every row). Only what
# the summary shows is measured: no op-level variants, fp32 before bf16.
bench_stage() {  # name cap reserve bench-args...
    local name="$1" cap="$2" reserve="$3"
    shift 3
    local left=$(( BUDGET - (SECONDS - START) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    # Leave time for the imports (torch, triton, transformers) and for writing the files.
    local inner=$(( limit > 60 ? limit - 30 : limit / 2 ))
    stage "$name" "$cap" "$reserve" "$PYTHON" -m benchmarks "$@" \
        ${BENCH_SIZE[@]+"${BENCH_SIZE[@]}"} ${BENCH_DROP[@]+"${BENCH_DROP[@]}"} \
        --out "$BENCH_DIR" --time-budget "$inner"
}
bench_stage bench_step 90 45 step --workloads "$WORKLOADS" --dtypes fp32,bf16 \
    --shapes-from transformers --target-seconds 0.3 --min-reps 5 --warmup 3
bench_stage bench_score 30 25 score --workloads "many-small-2000x4096,llama-1b" --dtypes fp32 \
    --target-seconds 0.3 --min-reps 5 --warmup 3
bench_stage bench_estimate 25 10 estimate --workloads "many-small-2000x4096,llama-1b" \
    --dtypes fp32 --target-seconds 0.3 --min-reps 5 --warmup 3

# ---------------------------------------------------------------- 7. summary
stage summary 10 0 "$PYTHON" -m benchmarks --from-json "$BENCH_DIR"

# ---------------------------------------------------------------- 8. the output contract
# Checked on OUT_DIR itself (after the final publish), so a dry run proves what a device run
# brings back.
check_output() {
    local files too_deep too_big bad_name
    files=$(find "$OUT_DIR" -type f | wc -l)
    too_deep=$(find "$OUT_DIR" -mindepth 4 | wc -l)
    too_big=$(find "$OUT_DIR" -type f -size +$(( LIMIT_BYTES / 1024 ))k | wc -l)
    bad_name=$(find "$OUT_DIR" -mindepth 1 | sed "s|^$OUT_DIR/||" | grep -c '[^A-Za-z0-9._/-]')
    echo "$files files (at most 8), $too_deep too deep, $too_big over 16 MiB, $bad_name badly named"
    [ "$files" -le 8 ] && [ "$too_deep" = 0 ] && [ "$too_big" = 0 ] && [ "$bad_name" = 0 ]
}
publish
OUTPUT_LINE="$(check_output)"
OUTPUT_RC=$?
record output_check "$OUTPUT_RC" 0 0 "$OUTPUT_LINE"
echo "output: $OUTPUT_LINE" >> "$WORK/run.txt"
publish

echo
echo "== stages (budget ${BUDGET}s, used $(( SECONDS - START ))s; commit $COMMIT; results in $OUT_DIR)"
column -t -s $'\t' "$STAGES" 2>/dev/null || cat "$STAGES"
echo "pytest: ${PYTEST_LINE:-no summary line}"
echo "output: $OUTPUT_LINE"
echo
if [ -s "$BENCH_DIR/summary.txt" ]; then
    cat "$BENCH_DIR/summary.txt"
else
    echo "no benchmark summary (see bench_*.log in gpu-check.tar.gz)"
fi

# Exit status: 0 when every stage that must work did (the extension and JIT stages may fail on
# a machine without nvcc/GPU: the kernels are then measured through whichever backends load).
FAILED=$(awk -F'\t' 'NR > 1 && $1 != "extension_import" && $1 != "jit_build" && $2 != "0" && $2 != "-" {n++} END {print n + 0}' "$STAGES")
exit $(( FAILED > 0 ? 1 : 0 ))
