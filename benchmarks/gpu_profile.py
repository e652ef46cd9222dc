"""`python -P benchmarks/gpu_profile.py`: a row norm's training step on each GPU backend, for
a profiler to watch (`ncu`, the GPU runbook's `profile` step). `-P`: the checkout's root must
not shadow the installed eqxnorm.

The H200 run found the row norms' Mosaic GPU kernels 1.15× to 4.5× slower than the Triton ones
while moving the ideal bytes (`benchmarks/results/nvidia-h200/`); a profile of both at one
shape says where the time goes (throughput, occupancy, stalls). Each backend's step is
compiled, run `--warmup` times, then `--repeats` times, so a profiler can skip the warm-up
launches; the wall-clock median is printed too.

    ncu -k regex:eqxnorm python -P benchmarks/gpu_profile.py --shape 4096x8192
    python -P benchmarks/gpu_profile.py --shape 8x256 --backends mosaic_gpu   # CPU: interpreter
"""

import argparse
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from eqxnorm import tune

OPS = ("layer_norm", "rms_norm")
BACKENDS = ("mosaic_gpu", "triton")


def run(op: str, shape: tuple[int, int], dtype, backend: str, warmup: int, repeats: int):
    """The training step's wall-clock seconds (`eqxnorm.tune`'s step and operands, on
    `backend`), `repeats` times after `warmup` runs."""
    args = tune.operands(op, shape, dtype)
    step = jax.jit(tune.training_step(op, backend))
    for _ in range(warmup):
        jax.block_until_ready(step(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    return times


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -P benchmarks/gpu_profile.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--op", choices=OPS, default="layer_norm")
    p.add_argument("--shape", default="4096x8192", help="ROWSxDIM")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    try:
        shape = tune.parse_shape(args.shape)
    except ValueError as error:
        p.error(str(error))
    for backend in args.backends:
        label = f"{args.op} {args.shape} {args.dtype} {backend}"
        try:
            times = run(args.op, shape, jnp.dtype(args.dtype), backend, args.warmup, args.repeats)
        except ValueError as error:  # a pinned backend that cannot run here (JAX < 0.12)
            print(f"{label}: not run ({error})")
            continue
        print(f"{label}: {statistics.median(times) * 1e3:.3f} ms (median)")


if __name__ == "__main__":
    main()
