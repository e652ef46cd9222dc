"""Timing: median of repeats after warm-up, each call waited for, on rotating input copies.

Every direction is timed as one callable:

- `fwd`: the jitted function (PyTorch: under `torch.no_grad()`, as inference runs).
- `bwd`: the VJP alone, given the residuals of a forward run beforehand (JAX: the jitted
  function returned by `jax.vjp`, fed the saved residuals; PyTorch: `torch.autograd.grad` on a
  retained graph).
- `fwd+bwd`: one jitted function returning the outputs and the gradients of every input
  (`jax.vjp` inside `jax.jit`; PyTorch: forward then `torch.autograd.grad`). The outputs are
  returned, so they are written, as the byte count assumes.

A [`Timer`][] makes the first call (tracing and compiling), the warm-up calls, then calibrates
`inner` so that a sample lasts at least `MIN_SAMPLE_S` (on a GPU a single small call would
measure the launch latency). A sample is `inner` back-to-back calls followed by one wait
(`jax.block_until_ready`; `torch.cuda.synchronize` on GPU), divided by `inner`. Successive
calls use different copies of the inputs (enough copies to exceed the last-level cache), so no
call finds its inputs in the cache left by the previous one. The figure reported is the median
sample (the fastest is kept too). `benchmarks._runner` takes the samples of all contenders in
turn, so a slow spell of a shared machine hits them alike.
"""

import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp

from ._contenders import JaxCase, TorchCase

MIN_SAMPLE_S = 2e-3
MAX_INNER = 1000
MAX_COPIES = 8
# Keep the rotating copies of a case's arrays under this many bytes.
MAX_COPY_BYTES = 2**30


@dataclasses.dataclass(frozen=True)
class Timing:
    """`ms`: median milliseconds per call; `ms_min`: the fastest sample; `compile_s`: the first
    call (tracing, compiling and running once)."""

    ms: float
    ms_min: float
    compile_s: float


def cache_bytes() -> int:
    """The last-level cache the rotating input copies must exceed: the CPU's largest cache
    level from sysfs, or on a GPU its L2 (50 MiB on an H100/H200 when PyTorch cannot say)."""
    if jax.default_backend() == "cpu":
        sizes = []
        for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
            text = path.read_text().strip().upper()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        return max(sizes, default=32 * 2**20)
    try:
        import torch

        return int(torch.cuda.get_device_properties(0).L2_cache_size)
    except Exception:  # no CUDA PyTorch: assume a large datacenter GPU's L2
        return 50 * 2**20


def copies_for(case_bytes: int, cache: int) -> int:
    """How many input copies to rotate through so that consecutive calls miss the cache."""
    wanted = math.ceil(2 * cache / max(case_bytes, 1))
    affordable = max(1, MAX_COPY_BYTES // max(case_bytes, 1))
    return max(1, min(wanted, MAX_COPIES, affordable))


class Timer:
    """Times `call(i)` (the `i`-th call; it picks its input copy), waited for by `wait`.

    The constructor makes the first call (`compile_s`), the warm-up calls, and calibrates
    `inner`; each `sample()` then times `inner` calls; `timing()` summarizes the samples.
    """

    def __init__(self, call: Callable[[int], Any], wait: Callable[[Any], Any], warmup: int):
        self.call, self.wait = call, wait
        start = time.perf_counter()
        wait(call(0))
        self.compile_s = time.perf_counter() - start
        for i in range(warmup):
            wait(call(i + 1))
        start = time.perf_counter()
        wait(call(0))
        single = time.perf_counter() - start
        self.inner = max(1, min(MAX_INNER, math.ceil(MIN_SAMPLE_S / max(single, 1e-9))))
        self.samples: list[float] = []

    def sample(self) -> None:
        start = time.perf_counter()
        out = None
        for i in range(self.inner):
            out = self.call(i)
        self.wait(out)
        self.samples.append((time.perf_counter() - start) / self.inner)

    def timing(self) -> Timing:
        return Timing(
            1e3 * statistics.median(self.samples), 1e3 * min(self.samples), self.compile_s
        )


# --- JAX ---------------------------------------------------------------------------------------


def _copies(tree: Any, n: int) -> list[Any]:
    return [tree] + [jax.tree.map(jnp.copy, tree) for _ in range(n - 1)]


def _fwd_bwd(fn: Callable) -> Callable:
    def run(args, cotangents):
        out, vjp = jax.vjp(fn, args)
        return out, vjp(cotangents)

    return run


def jax_callable(case: JaxCase, direction: str, copies: int) -> Callable[[int], Any]:
    """`call(i)` running `direction` of `case` on input copy `i % copies`."""
    args = _copies(case.args, copies)
    cts = _copies(case.cotangents, copies)
    if direction == "fwd":
        fwd = jax.jit(case.fn)
        return lambda i: fwd(args[i % copies])
    if direction == "bwd":
        forward = jax.jit(lambda a: jax.vjp(case.fn, a)[1])
        vjps = [forward(a) for a in args]
        backward = jax.jit(lambda vjp, ct: vjp(ct))
        return lambda i: backward(vjps[i % copies], cts[i % copies])
    both = jax.jit(_fwd_bwd(case.fn))
    return lambda i: both(args[i % copies], cts[i % copies])


def jax_residual_bytes(fn: Callable, args: Any) -> int:
    """The bytes `jax.vjp(fn, args)` keeps for the backward: the distinct arrays held by the
    VJP function (inputs it keeps, such as `x`, count; each array once; constants folded into
    the program, such as a literal `2.0`, do not)."""
    closed = jax.make_jaxpr(lambda a: jax.vjp(fn, a)[1])(args)
    kept = [v for v in closed.jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)]
    distinct = {id(v): v for v in kept}.values()
    return sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in distinct)


# --- PyTorch -----------------------------------------------------------------------------------


def _torch_copies(case: TorchCase, n: int) -> tuple[list[dict], list[tuple]]:
    def clone(t):
        return t.detach().clone().requires_grad_(t.requires_grad)

    tensors = [case.tensors] + [
        {k: clone(v) for k, v in case.tensors.items()} for _ in range(n - 1)
    ]
    cts = [case.cotangents] + [tuple(c.clone() for c in case.cotangents) for _ in range(n - 1)]
    return tensors, cts


def torch_callable(case: TorchCase, direction: str, copies: int) -> Callable[[int], Any]:
    import torch

    tensors, cts = _torch_copies(case, copies)

    def grads(outputs, inputs, cotangents, retain):
        return torch.autograd.grad(outputs, list(inputs.values()), cotangents, retain_graph=retain)

    if direction == "fwd":

        def forward(i):
            with torch.no_grad():
                return case.fn(tensors[i % copies])

        return forward
    if direction == "bwd":
        outputs = [case.fn(t) for t in tensors]
        return lambda i: grads(outputs[i % copies], tensors[i % copies], cts[i % copies], True)

    def both(i):
        t = tensors[i % copies]
        outputs = case.fn(t)
        return outputs, grads(outputs, t, cts[i % copies], False)

    return both


def torch_wait(case: TorchCase) -> Callable[[Any], None]:
    import torch

    if case.device.type == "cuda":
        return lambda _: torch.cuda.synchronize()
    return lambda _: None  # PyTorch on CPU returns when done


def torch_residual_bytes(case: TorchCase) -> int:
    """The bytes autograd saves for the backward (through `saved_tensors_hooks`): the distinct
    storages of the saved tensors, inputs such as `x` included."""
    import torch

    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        case.fn(case.tensors)
    return sum(storages.values())


# --- the roofline ------------------------------------------------------------------------------


def copy_callable(
    reads: list[tuple[int, ...]], writes: list[tuple[int, ...]], dtype: str, copies: int
) -> Callable[[int], Any]:
    """The roofline of an op: one jitted pass that reads arrays of the shapes `reads` and
    writes arrays of the shapes `writes` (those of the op, from
    `benchmarks._ops.case_arrays`), each once, so it moves exactly the op's ideal bytes in
    arrays of the op's sizes (one array of the total size would pay for a larger fresh
    allocation per call). Each written array is the sum of the read arrays of its shape (or
    a broadcast, when none has it) times its own runtime scalar, which XLA can neither elide
    nor fold; read arrays of a shape nothing is written in (the parameters of a forward) are
    summed into the first output."""
    arrays = _copies([jnp.ones(s, dtype) for s in reads], copies)
    scales = jnp.ones((len(writes),), dtype)

    def copy(inputs, scales):
        by_shape: dict[tuple[int, ...], list] = {}
        for a in inputs:
            by_shape.setdefault(a.shape, []).append(a)
        outputs = []
        for j, shape in enumerate(writes):
            sources = by_shape.get(tuple(shape))
            if sources:
                outputs.append(functools.reduce(jnp.add, sources) * scales[j])
            else:
                outputs.append(jnp.broadcast_to(scales[j], shape))
        leftover = [
            a for s, group in by_shape.items() if s not in map(tuple, writes) for a in group
        ]
        if leftover:
            outputs[0] = outputs[0] + sum(jnp.sum(a) for a in leftover)
        return outputs

    run = jax.jit(copy)
    return lambda i: run(arrays[i % copies], scales)
