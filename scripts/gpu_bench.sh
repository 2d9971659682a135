#!/usr/bin/env bash
# scripts/gpu_bench.py in one call on a lent GPU machine (see the device README), e.g.
#   scripts/gpu_bench.sh --write docs/benchmarks.md     # compiled bf16, then eager bf16
# The machine's python3 has torch and most of mt's needs; what it lacks (datasets, dill,
# multiprocess) travels as wheels in .whl/ (downloaded here with pip download, carried along).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import datasets" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_bench.sh: $PY lacks 'datasets' and there are no wheels in .whl/" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
"$PY" scripts/gpu_bench.py "$@"
"$PY" scripts/gpu_bench.py --no-compile "$@"
