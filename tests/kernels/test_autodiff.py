"""Every JAX transformation on every op and implementation (`eqxnorm.kernels._autodiff`):
forward mode, reverse mode, their compositions to second order, under `vmap`, `jit` with
sharded inputs, `jax.checkpoint`, `lax.scan` and `eqx.filter_vmap`; the kernels (Pallas'
interpret mode on this CPU) give the reference's values, and first-order reverse mode runs
the backward kernel with only `x` and per-row statistics kept."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

import eqxnorm
import kernel_support as ks
from eqxnorm import functional as F

IMPLS = ("pallas", "reference")


def _data(shape, seed):
    return ks.data(shape, jnp.float32, seed=seed, loc=0.3, scale=1.5)


def _params(width, seed=1):
    return ks.params(width, seed=seed)


# Each op: a function of its differentiable arguments (given `impl`) and those arguments, small
# so that every transformation below traces and runs in interpret mode within CI's budget.
OPS = {
    "layer_norm": (
        lambda impl: functools.partial(F.layer_norm, impl=impl),
        lambda: (_data((3, 8), 0), *_params(8)),
    ),
    "rms_norm": (
        lambda impl: functools.partial(F.rms_norm, impl=impl),
        lambda: (_data((3, 8), 0), *_params(8)),
    ),
    "add_layer_norm": (
        lambda impl: functools.partial(F.add_layer_norm, impl=impl),
        lambda: (_data((3, 8), 0), _data((3, 8), 2), *_params(8)),
    ),
    "add_rms_norm": (
        lambda impl: functools.partial(F.add_rms_norm, impl=impl),
        lambda: (_data((3, 8), 0), _data((3, 8), 2), *_params(8)),
    ),
    "adaptive_layer_norm": (
        lambda impl: functools.partial(F.adaptive_layer_norm, impl=impl),
        lambda: (_data((2, 3, 8), 0), 0.1 * _data((2, 8), 3), _data((2, 8), 4), *_params(8)),
    ),
    "adaptive_rms_norm": (
        lambda impl: functools.partial(F.adaptive_rms_norm, impl=impl),
        lambda: (_data((2, 3, 8), 0), 0.1 * _data((2, 8), 3), _data((2, 8), 4), *_params(8)),
    ),
    # The kernels applying `offset + weight` themselves: adaLN without affine parameters
    # (`1 + scale`), a zero-centred RMSNorm weight.
    "adaptive_layer_norm_plain": (
        lambda impl: lambda x, s, t: F.adaptive_layer_norm(x, s, t, impl=impl),
        lambda: (_data((2, 3, 8), 0), 0.1 * _data((2, 8), 3), _data((2, 8), 4)),
    ),
    "rms_norm_zero_centred": (
        lambda impl: functools.partial(F.rms_norm, weight_offset=1.0, impl=impl),
        lambda: (_data((3, 8), 0), 0.1 * _data((8,), 3)),
    ),
    "group_norm": (
        lambda impl: lambda x, w, b: F.group_norm(x, 2, w, b, impl=impl),
        lambda: (_data((2, 4, 3), 0), *_params(4)),
    ),
    "instance_norm": (
        lambda impl: functools.partial(F.instance_norm, impl=impl),
        lambda: (_data((2, 4, 3), 0), *_params(4)),
    ),
    "adaptive_group_norm": (
        lambda impl: lambda x, s, t, w, b: F.adaptive_group_norm(x, 2, s, t, w, b, impl=impl),
        lambda: (_data((2, 4, 3), 0), 0.1 * _data((2, 4), 3), _data((2, 4), 4), *_params(4)),
    ),
    "batch_norm": (
        lambda impl: functools.partial(F.batch_norm, impl=impl),
        lambda: (_data((4, 3, 2), 0), *_params(3)),
    ),
    "batch_norm_inference": (
        lambda impl: lambda x, m, v, w, b: F.batch_norm(x, w, b, mean=m, var=v, impl=impl)[0],
        lambda: (_data((4, 3, 2), 0), _data((3,), 5), 1 + jnp.abs(_data((3,), 6)), *_params(3)),
    ),
    "weight_standardize": (
        lambda impl: functools.partial(F.weight_standardize, impl=impl),
        lambda: (_data((4, 3, 2), 0),),
    ),
}


def _loss(fn):
    """`sum(sin(2·output))` over every output: not a plain sum, whose gradient through a
    normalization vanishes."""
    return lambda *args: sum(jnp.sum(jnp.sin(2 * o)) for o in jax.tree.leaves(fn(*args)))


def _squared_norm(tree):
    return sum(jnp.sum(jnp.square(t)) for t in jax.tree.leaves(tree))


def _derivatives(fn, args, every):
    """Derivatives of `fn` at `args`, in one jitted program: the JVP, the gradient of the
    gradient and the JVP of the gradient (forward-over-reverse, a Hessian-vector product);
    with `every`, also `jax.linearize`, `jax.jacfwd`, `jax.jacrev`, `jax.hessian`, `jax.grad`
    and `jax.grad` of a `jax.vjp` result."""
    loss = _loss(fn)
    argnums = tuple(range(len(args)))
    tangents = tuple(jnp.cos(3 * a) for a in args)

    def run(args, tangents):
        grad = jax.grad(loss, argnums=argnums)
        out = {
            "jvp": jax.jvp(fn, args, tangents),
            "grad_of_grad": jax.grad(lambda *a: _squared_norm(grad(*a)), argnums=argnums)(*args),
            "jvp_of_grad": jax.jvp(grad, args, tangents)[1],
        }
        if not every:
            return out

        def of_x(x):
            return fn(x, *args[1:])

        cotangent = jax.tree.map(jnp.sin, fn(*args))
        return out | {
            "linearize": jax.linearize(fn, *args)[1](*tangents),
            "jacfwd": jax.jacfwd(of_x)(args[0]),
            "jacrev": jax.jacrev(of_x)(args[0]),
            "hessian": jax.hessian(lambda x: loss(x, *args[1:]))(args[0]),
            "grad": grad(*args),
            "grad_of_vjp": jax.grad(
                lambda *a: _squared_norm(jax.vjp(fn, *a)[1](cotangent)), argnums=argnums
            )(*args),
        }

    return jax.jit(run)(args, tangents)


def _assert_trees_match(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        ks.assert_matches(a, e, jnp.float32)


def _assert_derivatives_match(op, every=False):
    build, make_args = OPS[op]
    args = make_args()
    _assert_trees_match(
        _derivatives(build("pallas"), args, every), _derivatives(build("reference"), args, every)
    )


# Every transformation on one op of each kernel family (each family has its own autodiff
# rules); the JVP and the two second orders on every op (the rest adds ~50 s in CI).
_EVERY = ("layer_norm", "group_norm", "batch_norm")


@pytest.mark.parametrize("op", OPS)
def test_derivatives_match_the_reference(op):
    _assert_derivatives_match(op, every=op in _EVERY)


# The Mosaic GPU kernels (in Mosaic GPU's interpreter here) under the same rules: one op per
# family at shapes TMA can stage (rows of a multiple of 16 bytes).
_MOSAIC_GPU_ARGS = {
    "layer_norm": lambda: (_data((3, 8), 0), *_params(8)),
    # One example (Mosaic GPU stages groups of at least a layout tile's rows, 64 here).
    "adaptive_layer_norm_plain": lambda: (
        _data((1, 3, 8), 0),
        0.1 * _data((1, 8), 3),
        _data((1, 8), 4),
    ),
    "group_norm": lambda: (_data((2, 4, 8), 0), *_params(4)),
    "batch_norm": lambda: (_data((4, 3, 8), 0), *_params(3)),
}


@pytest.mark.parametrize("op", _MOSAIC_GPU_ARGS)
def test_derivatives_of_the_mosaic_gpu_kernels_match_the_reference(op):
    build, args = OPS[op][0], _MOSAIC_GPU_ARGS[op]()
    actual = ks.run_mosaic_gpu(lambda: _derivatives(build("mosaic_gpu"), args, every=False))
    if actual is not None:
        _assert_trees_match(actual, _derivatives(build("reference"), args, every=False))


# --- finite differences ------------------------------------------------------------------------

# `eqxnorm.kernels` modules and a call of each family on small arrays.
_FAMILIES = {
    "layer_norm": (lambda m: functools.partial(m.layer_norm, eps=1e-5), (3, 8), 8),
    "group_norm": (lambda m: functools.partial(m.group_norm, groups=2, eps=1e-5), (2, 4, 3), 4),
    "batch_norm": (lambda m: lambda *a: m.batch_norm(*a, eps=1e-5)[0], (4, 3, 2), 3),
}


def _family_args(family, dtype):
    _, shape, width = _FAMILIES[family]
    return tuple(a.astype(dtype) for a in (_data(shape, 0), *_params(width)))


@pytest.mark.parametrize("family", _FAMILIES)
def test_check_grads_to_second_order(family):
    from eqxnorm.kernels import reference, row_norm

    make = _FAMILIES[family][0]
    with jax.enable_x64(True):
        args = _family_args(family, jnp.float64)
        check_grads(jax.jit(make(reference)), args, 2, ["fwd", "rev"])
    if family == "layer_norm":
        # The kernels' derivatives equal the reference's (above); float32 finite differences
        # once, with a step of 1e-2 and the tolerances of float32 second differences.
        kernel = jax.jit(make(row_norm))
        args = _family_args(family, jnp.float32)
        check_grads(kernel, args, 2, ["fwd", "rev"], atol=5e-2, rtol=5e-2, eps=1e-2)


# --- first order: the backward kernel, and what it keeps -------------------------------------


def _residuals(fn, args):
    """The arrays `jax.vjp(fn, *args)` keeps for the backward."""
    closed = jax.make_jaxpr(lambda a: jax.vjp(fn, *a)[1])(args)
    kept = [v for v in closed.jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)]
    return list({id(v): v.aval for v in kept}.values())


@pytest.mark.parametrize(
    ("op", "kernel"),
    [
        ("layer_norm", "eqxnorm_layer_norm_bwd"),
        ("add_rms_norm", "eqxnorm_add_rms_norm_bwd"),
        ("group_norm", "eqxnorm_group_norm_bwd"),
        ("batch_norm", "eqxnorm_batch_norm_sums"),
    ],
)
def test_first_order_runs_the_backward_kernel_and_keeps_x_and_statistics(op, kernel):
    build, make_args = OPS[op]
    fn, args = build("pallas"), make_args()
    grad = jax.grad(_loss(fn), argnums=tuple(range(len(args))))
    assert kernel in ks.lowered(grad, args, "cuda")
    kept = _residuals(fn, args)
    full = [a for a in kept if math.prod(a.shape) >= args[0].size]
    # x (the fused add keeps its output h instead), and nothing else of its size.
    assert [(math.prod(a.shape), a.dtype) for a in full] == [(args[0].size, args[0].dtype)]
    small = [a for a in kept if math.prod(a.shape) < args[0].size]
    assert all(a.dtype in (jnp.float32, jnp.bool_) for a in small)


# --- under the other transformations ----------------------------------------------------------


def _second_order(fn):
    """`fn`'s JVP and the gradient of its gradient's squared norm, with respect to `x`."""
    loss = _loss(fn)

    def run(x, t):
        jvp = jax.jvp(fn, (x,), (t,))[1]
        return jvp, jax.grad(lambda x: _squared_norm(jax.grad(loss)(x)))(x)

    return run


def _both_impls(make, *args):
    results = [jax.jit(_second_order(make(impl)))(*args) for impl in IMPLS]
    _assert_trees_match(*results)


def test_under_vmap_the_examples_fold_into_one_launch():
    x = _data((4, 3, 8), 0)
    weight, bias = _params(8)

    def make(impl):
        return jax.vmap(lambda x: F.layer_norm(x, weight, bias, impl=impl))

    _both_impls(make, x, jnp.cos(x))
    hvp = jax.vmap(_second_order(lambda x: F.layer_norm(x, weight, bias, impl="triton")))
    # The forward kernels of the examples run as one launch (folded into its rows; the
    # Triton launch, whose grid the lowering shows).
    assert ks.triton_grids(ks.lowered(hvp, (x, jnp.cos(x)), "cuda")).count((1, 1, 1)) >= 1


def test_jit_with_the_batch_sharded():
    mesh = jax.make_mesh((8,), ("batch",), devices=ks.devices(8))
    batch = NamedSharding(mesh, P("batch"))
    x = jax.device_put(_data((16, 4, 3), 0), batch)
    weight, bias = _params(4)
    _both_impls(lambda impl: lambda x: F.group_norm(x, 2, weight, bias, impl=impl), x, x)
    _both_impls(lambda impl: lambda x: F.batch_norm(x, weight, bias, impl=impl), x, x)


@pytest.mark.parametrize(
    "policy",
    [
        jax.checkpoint_policies.nothing_saveable,
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.everything_saveable,
    ],
)
def test_under_checkpoint(policy):
    x = _data((3, 8), 0)
    weight, bias = _params(8)

    def make(impl):
        return jax.checkpoint(lambda x: F.rms_norm(x, weight, bias, impl=impl), policy=policy)

    _both_impls(make, x, jnp.cos(x))


def test_scan_over_stacked_layers_and_an_ensemble():
    x = _data((3, 8), 0)

    def make(impl):
        @eqx.filter_vmap
        def layers(seed):
            weight, bias = jax.random.uniform(jax.random.key(seed), (2, 8), minval=0.5)
            return eqx.tree_at(
                lambda m: (m.weight, m.bias), eqxnorm.LayerNorm(8, impl=impl), (weight, bias)
            )

        stacked = layers(jnp.arange(3))
        params, static = eqx.partition(stacked, eqx.is_array)

        def scanned(x):
            def step(x, layer_params):
                return jnp.sin(jax.vmap(eqx.combine(layer_params, static))(x)) + x, None

            return jax.lax.scan(step, x, params)[0]

        ensemble = eqx.filter_vmap(lambda layer, x: jax.vmap(layer)(x), in_axes=(0, None))
        return lambda x: (scanned(x), ensemble(stacked, x))

    _both_impls(make, x, jnp.cos(x))


def test_batch_norm_pooled_over_a_named_axis():
    x = _data((2, 4, 3, 2), 0)
    weight, bias = _params(3)

    def make(impl):
        def one(x):
            return F.batch_norm(x, weight, bias, axis_name="members", impl=impl)

        return jax.vmap(one, axis_name="members")

    _both_impls(make, x, jnp.cos(x))
