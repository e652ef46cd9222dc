"""One process of a multi-process run (tests/test_multiprocess.py): the checks, and the
`python tests/multiprocess_worker.py` entry point that each process of the run starts with.

Every check builds the same global batch in every process (NumPy, fixed seeds), runs eqxnorm
on it across all processes' devices, and returns its outputs (and parameter gradients). Run as
a script, one process of `--processes` joins JAX's distributed runtime on loopback and writes
the pieces of each output it holds (`jax.Array.addressable_shards`) to `--out`, with the
compiled program's all-gathers and all-reduces; the test assembles the pieces and compares
them with the same check run in its own single process on unsharded arrays
(`expected`). The recipe is the README's "Many devices" section's, multi-process.
"""

import argparse
import functools
import pickle
import re
import sys
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqxnorm
import kernel_support as ks
from eqxnorm import functional as F

GLOBAL_DEVICES = 8
BATCH = 16


def _data(shape, seed):
    return np.random.default_rng(seed).normal(0.5, 2.0, size=shape).astype(np.float32)


def _params(width, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 1.5, size=width).astype(np.float32), rng.normal(size=width).astype(
        np.float32
    )


def _global(array, mesh, spec):
    """`array` (the same NumPy value in every process) as a global `jax.Array` sharded by
    `spec` over `mesh`, each process supplying the pieces of its own devices; unsharded
    (this process's default device) without a mesh."""
    if mesh is None:
        return jnp.asarray(array)
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _module(module, seed=1):
    """`module`'s parameters (random: ones and zeros would hide a wrong gradient) and the
    function applying it to a batch."""
    weight, bias = _params(module.weight.size, seed)
    module = eqx.tree_at(
        lambda m: (m.weight, m.bias),
        module,
        (
            jnp.asarray(weight.reshape(module.weight.shape)),
            jnp.asarray(bias.reshape(module.bias.shape)),
        ),
    )
    params, static = eqx.partition(module, eqx.is_inexact_array)
    return params, lambda params, x: jax.vmap(eqx.combine(params, static))(x)


# --- the checks ---------------------------------------------------------------------------------
# `check(impl, mesh) -> (result, compiled text)`: `mesh` is a global mesh of every process's
# devices, or `None` for the single-process run on unsharded arrays (then the text is "").


def _batch_sharded(params, fn, inputs, mesh):
    """`fn`'s outputs and gradients under `jit`, the inputs split over the batch across
    `mesh`'s "batch" axis and the parameters replicated."""
    step = jax.jit(ks.outputs_and_grads(fn))
    if mesh is None:
        return step(params, *(jnp.asarray(i) for i in inputs)), ""
    params = jax.tree.map(lambda p: _global(np.asarray(p), mesh, P()), params)
    inputs = tuple(_global(i, mesh, P("batch")) for i in inputs)
    compiled = step.lower(params, *inputs).compile()
    return compiled(params, *inputs), compiled.as_text()


def layer_norm_jit(impl, mesh):
    params, fn = _module(eqxnorm.LayerNorm(24, impl=impl))
    return _batch_sharded(params, fn, (_data((BATCH, 24), 0),), mesh)


def group_norm_jit(impl, mesh):
    params, fn = _module(eqxnorm.GroupNorm(2, 4, impl=impl))
    return _batch_sharded(params, fn, (_data((BATCH, 4, 3, 5), 0),), mesh)


def batch_norm_jit(impl, mesh):
    def fn(params, x):
        return F.batch_norm(x, *params, impl=impl)

    params = tuple(jnp.asarray(p) for p in _params(4))
    return _batch_sharded(params, fn, (_data((BATCH, 4, 3, 5), 0),), mesh)


def batch_norm_shard_map(impl, mesh):
    """The `BatchNorm` layer inside `shard_map` over every process's devices, its statistics
    pooled over the device axis and the `vmap` axis; one training step, then the running
    statistics."""
    x = _data((BATCH, 4, 3), 0)
    make = functools.partial(eqx.nn.make_with_state(eqxnorm.BatchNorm), 4, momentum=0.5, impl=impl)
    over_batch = dict(axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    if mesh is None:
        layer, state = make("batch")
        y, state = jax.jit(jax.vmap(layer, **over_batch))(jnp.asarray(x), state)
        return (y, jax.tree.leaves(state)), ""
    layer, state = make(("device", "batch"))
    step = jax.jit(
        jax.shard_map(
            jax.vmap(layer, **over_batch),
            mesh=mesh,
            in_specs=(P("device"), P()),
            out_specs=(P("device"), P()),
            check_vma=False,  # JAX 0.10: a collective over a vmap axis (README)
        )
    )
    state = jax.tree.map(lambda s: _global(np.asarray(s), mesh, P()), state)
    x = _global(x, mesh, P("device"))
    compiled = step.lower(x, state).compile()
    y, state = compiled(x, state)
    return (y, jax.tree.leaves(state)), compiled.as_text()


def layer_norm_tensor_parallel(impl, mesh):
    """`functional.layer_norm` with its 32 features split over every process's devices
    (`axis_name`): outputs and the gradients of the weight, bias and input slices."""
    x = _data((6, 3, 32), 0)
    params = tuple(jnp.asarray(p) for p in _params(32))

    def fn(params, x, axis_name=None):
        return F.layer_norm(x, *params, axis_name=axis_name, impl=impl)

    if mesh is None:
        return jax.jit(ks.outputs_and_grads(fn))(params, jnp.asarray(x)), ""
    features = P(None, None, "model")
    step = jax.jit(
        jax.shard_map(
            ks.outputs_and_grads(functools.partial(fn, axis_name="model")),
            mesh=mesh,
            in_specs=(P("model"), features),
            out_specs=(features, (P("model"), features)),
        )
    )
    params = tuple(_global(np.asarray(p), mesh, P("model")) for p in params)
    x = _global(x, mesh, features)
    compiled = step.lower(params, x).compile()
    return compiled(params, x), compiled.as_text()


# name -> (check, mesh axis name, mesh axis type)
CHECKS: dict[str, tuple[Callable, str, AxisType]] = {
    "layer_norm_jit": (layer_norm_jit, "batch", AxisType.Auto),
    "layer_norm_jit_explicit": (layer_norm_jit, "batch", AxisType.Explicit),
    "group_norm_jit": (group_norm_jit, "batch", AxisType.Auto),
    "batch_norm_jit": (batch_norm_jit, "batch", AxisType.Auto),
    "batch_norm_shard_map": (batch_norm_shard_map, "device", AxisType.Auto),
    "layer_norm_tensor_parallel": (layer_norm_tensor_parallel, "model", AxisType.Auto),
}


def expected(name):
    """The single-process result of check `name`: the reference on unsharded arrays."""
    result, _ = CHECKS[name][0]("reference", None)
    return jax.tree.map(np.asarray, result)


_COLLECTIVE = re.compile(r" (all-gather|all-reduce|all-to-all|collective-permute)(-start)?\(")


def collectives(compiled_text):
    """The collective ops of a compiled program, `{"all-gather": [lines], ...}`."""
    found: dict[str, list[str]] = {}
    for line in compiled_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match:
            found.setdefault(match.group(1), []).append(line.strip())
    return found


def _local_pieces(result):
    """Each output leaf as the `(index, value)` pieces this process holds."""
    return [
        [(shard.index, np.asarray(shard.data)) for shard in leaf.addressable_shards]
        for leaf in jax.tree.leaves(result)
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True, help="host:port of process 0")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--cases", required=True, help="check:impl,... to run, in order")
    parser.add_argument("--out", required=True, help="file to write the results to (pickle)")
    args = parser.parse_args(argv)

    # Before any backend exists: this process's share of the 8 global CPU devices, and CPU
    # collectives across processes (gloo, over TCP on the coordinator's loopback address).
    jax.config.update("jax_num_cpu_devices", GLOBAL_DEVICES // args.processes)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.processes,
        process_id=args.process_id,
        initialization_timeout=60,
        # The coordinator service listens on every interface by default.
        coordinator_bind_address=args.coordinator,
    )
    assert jax.device_count() == GLOBAL_DEVICES, jax.devices()
    results = {}
    for case in args.cases.split(","):
        name, impl = case.split(":")
        check, axis, axis_type = CHECKS[name]
        # Every process's devices: `jax.make_mesh` uses `jax.devices()`, the global list.
        mesh = jax.make_mesh((GLOBAL_DEVICES,), (axis,), axis_types=(axis_type,))
        result, text = check(impl, mesh)
        results[name, impl] = (_local_pieces(result), collectives(text))
    with open(args.out, "wb") as file:
        pickle.dump(results, file)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
