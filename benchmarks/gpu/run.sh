#!/usr/bin/env bash
# Issue-16 GPU benchmark: one prepared device call (<= 8 minutes), or its dry run on a CPU.
#
#   bash benchmarks/gpu/run.sh                      # device: results.json, results.md, run.log under $OUT
#   bash benchmarks/gpu/run.sh --dry-run --out DIR  # any CPU machine, tiny sizes, well under a minute
#
# On the device the wheels that benchmarks/gpu/prepare.sh put in .whl/ (carried with the call) are installed
# into /tmp/site first; the dry run never installs anything. Other arguments go to gpu_bench.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
dry=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && dry=1; done
pyver="$("$python" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
if [[ $dry -eq 0 ]] && compgen -G ".whl/*.whl" >/dev/null; then
    if [[ "$pyver" == 312 ]]; then  # prepare.sh fetches cp312 wheels: the device's python3 is 3.12
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "run.sh: not installing .whl/ (wheels for Python 3.12; this is $pyver)" >&2
    fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ $dry -eq 0 && -n "${OUT:-}" ]]; then
    "$python" benchmarks/gpu/gpu_bench.py "$@" 2>&1 | tee "$OUT/run.log"
else
    exec "$python" benchmarks/gpu/gpu_bench.py "$@"
fi
