#!/usr/bin/env bash
# Verifies on the GPU machine: the build with its default CC (/opt/gcc) links libstdc++ shared
# and its ops run; the CUDA-marked tests pass.
set -u
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
exec > >(tee "$OUT/verify.log") 2>&1
echo "== verify"
FISHERFORGET_CUDA=1 python -m pip install --no-build-isolation --no-deps --no-index -v -e . > "$OUT/build.log" 2>&1
echo "== build rc=$?"; grep -E 'g\+\+ .*-shared' "$OUT/build.log" | grep -o -- 'libstdc++[^ ]*' | head -1
ldd fisherforget/_C*.so | grep -E 'stdc|gomp'
python benchmarks/device/probe.py build_info step_cuda
timeout 140 python -m pytest -m cuda -v -rfEs -p no:cacheprovider --continue-on-collection-errors --durations=25 --deselect tests/backends/test_cuda.py::test_gpu_jit_build_on_a_clean_cache --timeout=60 --timeout-method=signal tests > "$OUT/pytest_cuda.log" 2>&1
echo "== pytest rc=$?"; grep -E '^(FAILED|ERROR)' "$OUT/pytest_cuda.log" | head -20; tail -3 "$OUT/pytest_cuda.log"
