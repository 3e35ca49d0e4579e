#!/usr/bin/env bash
# The GPU check: build the kernels for this GPU, run the GPU tests, then the benchmark. About 3-5 minutes on
# one H100. Writes gpu_tests.log, bench.log and bench.json to $OUT (or the current folder).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
python nada.py doctor --build-ops --device cuda 2>&1 | tee "$out/doctor.log"
python -m pytest -q -p no:cacheprovider -k "gpu or kernel" test_nada.py 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
python ops/bench.py --device cuda --out "$out/bench.json" 2>&1 | tee "$out/bench.log"
exit $(( tests || PIPESTATUS[0] ))
