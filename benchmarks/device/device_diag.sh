#!/usr/bin/env bash
# One device call: find why fisherforget._C segfaults at its first op call, try two other builds,
# then run benchmarks/gpu_check.sh with the first build that works (or Triton alone).
set -u
COMMIT="$1"; T0=$SECONDS
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
mkdir -p /tmp/builds
exec > >(tee "$OUT/diag.log") 2>&1
echo "== tools"; /opt/gcc/bin/gcc --version | head -1; ls /usr/bin/g++* /usr/bin/gcc* 2>&1 | head
/usr/bin/g++ --version 2>&1 | head -1; command -v gdb catchsegv
env | grep -E '^(CC|CXX|CFLAGS|LDFLAGS|LDSHARED|CUDA_HOME|LD_LIBRARY_PATH)=' 
python -c "import sysconfig as s; print('LDSHARED', s.get_config_var('LDSHARED')); print('CC', s.get_config_var('CC'))"
python -c "import torch; print(torch.__version__, torch._C._GLIBCXX_USE_CXX11_ABI, torch.__config__.show())" | head -12
build() {  # name, env...
    local name="$1"; shift
    rm -rf build fisherforget/_C*.so
    env "$@" FISHERFORGET_CUDA=1 python -m pip install --no-build-isolation --no-deps --no-index -v -e . > /tmp/builds/$name.log 2>&1
    echo "== build $name rc=$? at $((SECONDS-T0))s"
    ldd fisherforget/_C*.so | grep -E 'gomp|stdc|gcc_s|torch|c10|not found'; true
}
works() { python -X faulthandler -c "import torch, fisherforget._C; print(torch.ops.fisherforget_C.build_info())"; }
build A
python benchmarks/device/probe.py build_info score_cpu score_cuda step_cuda
if command -v gdb >/dev/null; then
    gdb -q -batch -ex run -ex bt --args python -c "import torch, fisherforget._C; print(torch.ops.fisherforget_C.build_info())" 2>&1 | grep -E '^#' | head -25
fi
GOOD=""
if works; then GOOD="default"; else
    if [ -x /usr/bin/g++ ]; then
        build B CC=/usr/bin/gcc CXX=/usr/bin/g++ && works && GOOD="B" && export CC=/usr/bin/gcc CXX=/usr/bin/g++
    fi
    if [ -z "$GOOD" ]; then
        build C LDSHARED="${CXX:-/opt/gcc/bin/g++} -shared" && works && GOOD="C" && export LDSHARED="${CXX:-/opt/gcc/bin/g++} -shared"
    fi
fi
echo "== working build: ${GOOD:-none} at $((SECONDS-T0))s"
tar -czf "$OUT/diag-builds.tar.gz" -C /tmp/builds .
LEFT=$(( 575 - (SECONDS - T0) ))
if [ -n "$GOOD" ]; then
    GPU_CHECK_BUDGET_S=$LEFT bash benchmarks/gpu_check.sh --commit "$COMMIT" "$OUT/check"
else
    rm -rf fisherforget/_C*.so  # Triton alone
    timeout $((LEFT-60)) python -m pytest -m cuda -q -x -p no:cacheprovider tests 2>&1 | tail -30
    timeout 50 python -m benchmarks step --workloads many-small-2000x4096,llama-1b --dtypes fp32 --skip-variants reference --out "$OUT/bench" --time-budget 40 2>&1 | tail -20
fi
