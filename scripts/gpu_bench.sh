#!/usr/bin/env bash
# scripts/gpu_bench.py's three sections in one call on a lent GPU machine (see the device README):
#   scripts/gpu_bench.sh --write docs/benchmarks.md
# 1. eager training steps and beam-5 decoding; 2. `mt train` itself against its model;
# 3. torch.compile'd training steps, last, since compiling is slow (on an H200 the first graph
# took about two minutes and Inductor recompiled on a size guard after it) and may fail.
# Each section has a time limit, 540 s together, so that the whole run fits one 10-minute call
# on one H100/H200: a section over its limit is lost, not the others, and the exit status says so.
# Section 3 trains on data/multi30k if there is a copy (with an 8k vocabulary), else on made-up
# text. Python: $PYTHON, else .venv's (make install), else python3: a lent GPU machine's python3
# has torch and most of mt's needs; what it lacks (datasets, dill, multiprocess) travels as wheels
# in .whl/ (downloaded here with pip download, carried along).
set -uo pipefail
cd "$(dirname "$0")/.."
default_python=python3
[ -x .venv/bin/python ] && default_python=.venv/bin/python
PY=${PYTHON:-$default_python}
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

trainer_data=()
if [ -f data/multi30k/train.de.gz ] && [ -f data/multi30k/train.en.gz ]; then
    trainer_data=(--data data/multi30k/train --vocab 8000)
fi
status=0
section() {  # LIMIT_SECONDS ARGS...: one gpu_bench.py section, stopped at its limit
    local limit=$1 start=$SECONDS
    shift
    if ! timeout "$limit" "$PY" scripts/gpu_bench.py "$@"; then
        echo "gpu_bench.sh: 'gpu_bench.py $*' failed or ran past ${limit} s" >&2
        status=1
    fi
    echo "gpu_bench.sh: $((SECONDS - start)) s for 'gpu_bench.py $*'" >&2
}
section 100 --no-compile "$@"
section 110 --trainer ${trainer_data[@]+"${trainer_data[@]}"} "$@"
section 330 "$@"
exit "$status"
