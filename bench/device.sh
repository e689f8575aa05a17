#!/usr/bin/env bash
# The GPU benchmark on a bare device machine, in one command that ends within 6 minutes:
#
#     bash bench/device.sh [--tiny]      (writes gpu.json and gpu.md to $OUT, default bench_out/gpu)
#
# The wheels `make device-bundle` wrote into .device-bundle/ (what such a machine lacks: omegaconf, orjson,
# torchao; an ignored folder, so whatever copies the checkout there must carry it) are installed first when missing,
# offline, into a folder of their own; then bench/gpu.py runs with the repository on the path.
# tests/test_gpu_bench.py runs this script with --tiny on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench_out/gpu}
if ! "$PYTHON" -c "import omegaconf, orjson, torchao" 2> /dev/null; then
    if compgen -G ".device-bundle/*.whl" > /dev/null; then
        site=$(mktemp -d)
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" .device-bundle/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    elif ! "$PYTHON" -c "import omegaconf, orjson" 2> /dev/null; then  # without torchao only float8's row is skipped
        echo "error: no omegaconf/orjson here and no .device-bundle/ (make device-bundle)" >&2; exit 2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the benchmark starts no measurement after 320 s; the rest of the 6 minutes is the install, start-up and the report
exec timeout --kill-after=5 345 "$PYTHON" bench/gpu.py --out "$OUT" --budget-s 320 "$@"
