#!/usr/bin/env bash
# The GPU runbook: everything a session with a GPU at hand runs, in one go, in 10 minutes at most
# (the steps' limits add up to 600 s; the device tool allows 600 s a command).
#
#   bash benchmarks/gpu_runbook.sh [RESULTS_DIR]
#   RUNBOOK_SKIP="tests tune" bash benchmarks/gpu_runbook.sh    # leave steps out (their keys below)
#
# 1. eqxnorm installed from this checkout without the network (`--no-index`): a machine
#    whose image lacks a dependency gets it from wheels in `.whl/` (made where pip works:
#    `pip download --no-deps --only-binary=:all: -d .whl beartype`).
# 2. `tests`: the kernel tests natively on the GPU (`JAX_PLATFORMS=cuda`: the kernels
#    `impl="auto"` picks there, Mosaic GPU's on Hopper and newer with JAX 0.12+, else Triton's,
#    and the Mosaic GPU kernels pinned, compiled and run on the device against the reference
#    compiled by XLA for it), 3 minutes at most.
# 3. `tune`: the tuner (`python -m eqxnorm.tune`) on LayerNorm and RMSNorm, bf16 4096x1024: the
#    block configurations of both GPU backends and XLA timed, the cache written to
#    RESULTS_DIR/tuning.json (the file a user's `~/.cache/eqxnorm/tuning.json` would be),
#    90 s at most.
# 4. `bench`: the full benchmark (`python -m benchmarks --full`: every op at the GPU suite's
#    shapes, bf16, against XLA, eqx.nn, Flax, PyTorch eager and torch.compile, Liger and
#    tokamax where installed, and a device copy) with the tuning cache of step 3, 3.5 minutes
#    at most, its results (CSV, JSON, plots, and `summary.md` with the target verdicts: issue
#    17's as MET/MISSED lines, the peers' time ratios from this run and the deviceless check's
#    verdicts on the committed deviceless tables, `benchmarks/results/deviceless-h200*/`, made
#    on a CPU machine: bytes, launches, spills, single reads, occupancy) under RESULTS_DIR
#    (default `benchmarks/results/<gpu name>/`, the folder to commit).
#
# Each step is bounded by `timeout`, and a failed step does not stop the next; the exit status
# is the first failure's. Logs go to RESULTS_DIR/runbook.log (and to $OUT when set, as the
# device tool of this workplace collects it).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
slug=$(echo "${gpu:-unknown-gpu}" | tr '[:upper:] ' '[:lower:]-' | tr -cd 'a-z0-9-')
results=${1:-benchmarks/results/$slug}
mkdir -p "$results"
log=$results/runbook.log
: >"$log"
status=0

skip=" ${RUNBOOK_SKIP:-} "

step() {
    local key=$1 limit=$2 name=$3
    shift 3
    if [[ "$skip" == *" $key "* ]]; then
        echo "== $name: skipped (RUNBOOK_SKIP)" | tee -a "$log"
        return
    fi
    echo "== $name (at most $limit s)" | tee -a "$log"
    local start=$SECONDS code=0
    timeout "$limit" "$@" 2>&1 | tee -a "$log" || code=${PIPESTATUS[0]}
    echo "== $name: exit $code after $((SECONDS - start)) s" | tee -a "$log"
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; fi
}

site=$(mktemp -d)
if compgen -G ".whl/*.whl" >/dev/null; then
    step install 45 "carried wheels" "$python" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
fi
step install 45 "eqxnorm from this checkout" \
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" .
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
step environment 30 "environment" bash -c "nvidia-smi; $python -c 'import jax, eqxnorm; print(jax.__version__, jax.devices())'"

# `-P`: the checkout's root must not shadow the installed package (see the README).
step tests 180 "kernel tests on the GPU" env JAX_PLATFORMS=cuda "$python" -P -m pytest -q -x -p no:cacheprovider \
    tests/kernels/test_row_norm.py tests/kernels/test_group_norm.py \
    tests/kernels/test_batch_norm.py tests/kernels/test_reference.py \
    tests/kernels/test_row_norm_mosaic_gpu.py tests/kernels/test_group_norm_mosaic_gpu.py \
    tests/kernels/test_batch_norm_mosaic_gpu.py
step tune 90 "tuner" env JAX_PLATFORMS=cuda "$python" -P -m eqxnorm.tune \
    --ops layer_norm rms_norm --shapes 4096x1024 --dtypes bfloat16 --out "$results/tuning.json"
step bench 210 "full benchmark" env JAX_PLATFORMS=cuda EQXNORM_TUNING_CACHE="$results/tuning.json" \
    "$python" -m benchmarks --full --dtypes bfloat16 --out "$results" \
    --deviceless benchmarks/results/deviceless-h200 benchmarks/results/deviceless-h200-mosaic-gpu

if [ -n "${OUT:-}" ]; then
    cp -r "$results"/. "$OUT"/ 2>/dev/null || true
fi
echo "== runbook done: exit status $status; results in $results" | tee -a "$log"
exit "$status"
