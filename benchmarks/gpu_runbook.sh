#!/usr/bin/env bash
# The GPU runbook: everything a session with a GPU at hand runs, in one go, in under 10 minutes
# (the steps' limits add up to about 600 s, the device tool's limit a command; on the H200 the
# steps took about 300 s).
#
#   bash benchmarks/gpu_runbook.sh [RESULTS_DIR]
#   RUNBOOK_SKIP="tests tune" bash benchmarks/gpu_runbook.sh    # leave steps out (their keys below)
#   RUNBOOK_BENCH="--full" bash benchmarks/gpu_runbook.sh       # the benchmark's arguments
#
# 1. eqxnorm installed from this checkout without the network (`--no-index`): a machine
#    whose image lacks a dependency gets it from wheels in `.whl/` (made where pip works:
#    `pip download --no-deps --only-binary=:all: -d .whl beartype liger-kernel`).
# 2. `tests`: the kernel tests natively on the GPU (`JAX_PLATFORMS=cuda`: the kernels
#    `impl="auto"` picks there, Mosaic GPU's on Hopper and newer with JAX 0.12+, else Triton's,
#    and the Mosaic GPU kernels pinned, compiled and run on the device against the reference
#    compiled by XLA for it), 3 minutes at most, in parallel where pytest-xdist is installed;
#    the verdicts also in RESULTS_DIR/tests.xml.
# 3. `tune`: the tuner (`python -m eqxnorm.tune`) on LayerNorm and RMSNorm, bf16 4096x1024 and
#    4096x8192, and GroupNorm at 32x128x56x56: the block configurations of both GPU backends
#    (Mosaic GPU's forward at 8192 in tiles of 4 rows and folded, one row a program) and XLA
#    timed, the cache written to RESULTS_DIR/tuning.json (the file a user's
#    `~/.cache/eqxnorm/tuning.json` would be), and used by the benchmark, whose `impl="auto"`
#    then runs each call on the backend measured faster (its last lines say which); 90 s at
#    most (19 s for 4096x1024 alone on the H200). Its entries, merged into
#    `kernels/_measured_tuning.json`, ship to every user of that GPU and JAX
#    (`eqxnorm.kernels._tuning.SHIPPED`): where Mosaic GPU measured faster, `impl="auto"` takes
#    it there.
# 4. `profile`: Nsight Compute (`ncu`, where installed) on a LayerNorm training step, bf16
#    4096x8192, Mosaic GPU and Triton (`benchmarks/gpu_profile.py`): RESULTS_DIR/profile.csv,
#    90 s at most.
# 5. `bench`: the benchmark (`python -m benchmarks`, bf16: the row norms at 4096 rows of 1024,
#    8192 and 65536, the channel norms at 32x128x56x56, the transformer block's training step,
#    against XLA, eqx.nn, Flax, PyTorch eager, Liger where installed, and a device copy) with
#    the tuning cache of step 3, 200 s at most, its results (CSV, JSON, plots, and
#    `summary.md` with the target verdicts: issue 17's as MET/MISSED lines, the peers' time
#    ratios from this run and the deviceless check's verdicts on the committed deviceless
#    tables, `benchmarks/results/deviceless-h200*/`, made on a CPU machine: bytes, launches,
#    spills, single reads, occupancy) under RESULTS_DIR (default `benchmarks/results/<gpu
#    name>/`, the folder to commit).
#
# Each step is bounded by `timeout`, and a failed step does not stop the next; the exit status
# is the first failure's. Logs go to RESULTS_DIR/runbook.log; with $OUT set (the device tool of
# this workplace), the results come back as $OUT/results.tar.gz beside summary.md and the log.
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
step environment 30 "environment" bash -c "nvidia-smi; $python -P -c 'import jax, eqxnorm; print(jax.__version__, jax.devices())'"

# `-P`: the checkout's root must not shadow the installed package (see the README). Mosaic GPU's
# tests first, then Triton's (what `impl="auto"` runs on older GPUs and JAX), the autodiff rules,
# the reference last. Where pytest-xdist is installed the tests run in parallel (compiles are
# CPU-bound; no process takes the GPU's memory up front), and where pytest-timeout is, a test
# that hangs (a cluster barrier never met) is stopped and reported rather than eating the step.
pytest_args=(-q -p no:cacheprovider -rfE --durations 15 --junitxml "$results/tests.xml")
if "$python" -c "import xdist" 2>/dev/null; then pytest_args+=(-n "${RUNBOOK_WORKERS:-8}"); fi
if "$python" -c "import pytest_timeout" 2>/dev/null; then pytest_args+=(--timeout 120); fi
# pytest-benchmark warns under xdist, and the suite makes warnings errors.
if "$python" -c "import pytest_benchmark" 2>/dev/null; then pytest_args+=(-p no:benchmark); fi
# `cuda,cpu`: the GPU is the default device; the host's CPU devices serve the tests that run
# an interpreter explicitly (its callbacks) and those that shard across 8 devices. No excess
# precision: XLA's GPU compiler otherwise drops a float32 -> bfloat16 -> float32 round trip
# (`y` cast to its dtype, then back for the loss), so the jitted reference would differentiate
# an unrounded `y` where the kernels' `y` is rounded (8 tests differed by bfloat16 rounding on
# an H200, with or without Mosaic GPU's automatic barriers).
step tests 180 "kernel tests on the GPU" env JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_allow_excess_precision=false" \
    "$python" -P -m pytest "${pytest_args[@]}" \
    tests/kernels/test_row_norm_mosaic_gpu.py tests/kernels/test_group_norm_mosaic_gpu.py \
    tests/kernels/test_batch_norm_mosaic_gpu.py tests/kernels/test_row_norm.py \
    tests/kernels/test_group_norm.py tests/kernels/test_batch_norm.py \
    tests/kernels/test_autodiff.py tests/kernels/test_reference.py
step tune 90 "tuner" env JAX_PLATFORMS=cuda "$python" -P -m eqxnorm.tune \
    --ops layer_norm rms_norm group_norm --shapes 4096x1024 4096x8192 32x128x56x56 \
    --dtypes bfloat16 --out "$results/tuning.json"
# Nsight Compute on a LayerNorm training step (bf16, 4096x8192) on both GPU backends: where
# the Mosaic GPU kernels' time goes (on the H200 they were 4.5x slower than Triton's there,
# moving the ideal bytes). Skipped where `ncu` is missing; clocks left as they are.
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
if [ -n "$ncu" ]; then
    step profile 90 "kernel profile (ncu)" env JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false \
        "$ncu" --clock-control none --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section MemoryWorkloadAnalysis --section WarpStateStats \
        -k regex:eqxnorm --csv --log-file "$results/profile.csv" \
        "$python" -P benchmarks/gpu_profile.py --shape 4096x8192 --warmup 1 --repeats 1
else
    echo "== kernel profile: skipped (no ncu)" | tee -a "$log"
fi

# The benchmark of what fits the step (`RUNBOOK_BENCH` overrides its arguments; `--full`, every
# op at the GPU suite's shapes, takes far longer): the row norms at a narrow, a wide and a
# one-read-only-by-cluster width, the channel norms on one NCHW shape, the transformer block's
# training step. Stopped at its limit, it reports the cases it finished (SIGTERM).
bench_args=${RUNBOOK_BENCH:---ops layer_norm,rms_norm,add_rms_norm,adaptive_layer_norm,group_norm,batch_norm,rms_norm_fp8 --shapes 4096x1024,4096x8192,4096x65536,32x128x56x56 --direction fwd fwd+bwd --impls pallas,mosaic_gpu,reference,module,eqx,flax,torch,liger,copy --blocks transformer --repeats 20}
# shellcheck disable=SC2086  # word-split on purpose
step bench 200 "benchmark" env JAX_PLATFORMS=cuda EQXNORM_TUNING_CACHE="$results/tuning.json" \
    "$python" -m benchmarks $bench_args --dtypes bfloat16 --out "$results" \
    --deviceless benchmarks/results/deviceless-h200 benchmarks/results/deviceless-h200-mosaic-gpu

if [ -n "${OUT:-}" ]; then
    # The device tool brings back at most 8 files: the folder as one archive, and beside it
    # what to read first.
    tar -czf "$OUT/results.tar.gz" -C "$results" . 2>/dev/null || true
    cp "$results"/summary.md "$results"/runbook.log "$OUT"/ 2>/dev/null || true
fi
echo "== runbook done: exit status $status; results in $results" | tee -a "$log"
exit "$status"
