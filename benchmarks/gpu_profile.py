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

from eqxnorm.kernels import pallas

OPS = ("layer_norm", "rms_norm")
BACKENDS = ("mosaic_gpu", "triton")


def training_step(op: str, backend: str):
    """`(x, weight, bias, dy) -> (dx, dweight, dbias)` of `sum(y · dy)`, jitted, on `backend`."""
    fn = getattr(pallas.backend(backend), op)

    def loss(x, weight, bias, dy):
        return jnp.sum(fn(x, weight, bias, eps=1e-5).astype(jnp.float32) * dy)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def run(op: str, shape: tuple[int, int], dtype, backend: str, warmup: int, repeats: int):
    """The step's wall-clock seconds, `repeats` times after `warmup` runs."""
    rows, width = shape
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], shape, jnp.float32).astype(dtype)
    weight = (1 + 0.1 * jax.random.normal(keys[1], (width,))).astype(dtype)
    bias = (0.1 * jax.random.normal(keys[2], (width,))).astype(dtype)
    dy = jax.random.normal(keys[3], shape, jnp.float32)
    step = training_step(op, backend)
    for _ in range(warmup):
        jax.block_until_ready(step(x, weight, bias, dy))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(x, weight, bias, dy))
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
    rows, _, width = args.shape.partition("x")
    if not (rows.isdigit() and width.isdigit()):
        p.error(f"--shape is ROWSxDIM, e.g. 4096x8192, but got {args.shape!r}")
    shape = (int(rows), int(width))
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
