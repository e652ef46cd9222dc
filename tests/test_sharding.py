"""Sharded and multi-device use, on the 8 host CPU devices of `conftest.py`: every layer under
`jax.jit` with its batch sharded (Auto and Explicit meshes) and inside `shard_map` equals the
single-device result, forward and gradients, and the Pallas kernels run on each device's own
rows (no all-gather in the compiled program); BatchNorm pools its statistics across devices
through `axis_name`; LayerNorm/RMSNorm with their features split across devices pool theirs.

The single-device result is the reference implementation's, jitted without sharding: the
kernels match it to `kernel_support.TOLERANCES` (tests/kernels), and compiling the
interpreted kernels once more per case would double this file's time."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqxnorm
import kernel_support as ks
from eqxnorm import functional as F
from eqxnorm.kernels import _common as c, batch_norm as bn_kernels

DEVICES = 8
BATCH = 16
IMPLS = ("reference", "pallas")


def _mesh(axis_type=AxisType.Auto, name="batch"):
    return jax.make_mesh((DEVICES,), (name,), axis_types=(axis_type,))


def _data(shape, seed):
    return ks.data(shape, jnp.float32, seed=seed)


def _with_params(module, seed):
    """`module` with its weight and bias replaced by random values (ones and zeros would hide
    a wrong parameter gradient)."""
    weight, bias = ks.params(module.weight.size, seed=seed)
    return eqx.tree_at(
        lambda m: (m.weight, m.bias),
        module,
        (weight.reshape(module.weight.shape), bias.reshape(module.bias.shape)),
    )


# --- the layers ---------------------------------------------------------------------------------
# Each case: `build(impl) -> (fn, params, inputs)`; `fn(params, *inputs)` returns an array or a
# tuple of arrays; every input's leading axis is the batch, the parameters are replicated.


def _module_case(make, shape):
    def build(impl):
        params, static = eqx.partition(_with_params(make(impl), seed=1), eqx.is_inexact_array)

        def fn(params, x):
            return jax.vmap(eqx.combine(params, static))(x)

        return fn, params, (_data((BATCH, *shape), seed=0),)

    return build


def _batch_norm(impl):
    weight, bias = ks.params(4, seed=1)

    def fn(params, x):
        return F.batch_norm(x, *params, impl=impl)

    return fn, (weight, bias), (_data((BATCH, 4, 3, 5), seed=0),)


def _weight_standardization(impl):
    linear = eqx.nn.Linear(24, 6, key=jax.random.key(3))
    layer = eqxnorm.WeightStandardization(linear, impl=impl)
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def fn(params, x):
        return jax.vmap(eqx.combine(params, static))(x)

    return fn, params, (_data((BATCH, 24), seed=0),)


def _add_layer_norm(impl):
    def fn(params, x, residual):
        return F.add_layer_norm(x, residual, *params, impl=impl)

    return fn, ks.params(24, seed=1), (_data((BATCH, 24), 0), _data((BATCH, 24), 2))


def _adaptive_layer_norm(impl):
    def fn(params, x, scale, shift):
        return F.adaptive_layer_norm(x, scale, shift, *params, impl=impl)

    inputs = (_data((BATCH, 3, 24), 0), 0.1 * _data((BATCH, 24), 2), _data((BATCH, 24), 4))
    return fn, ks.params(24, seed=1), inputs


def _batch_norm_module(impl):
    """BatchNorm's training step, its state passed in unplaced (as `make_with_state` gives
    it): the new running statistics must keep the old ones' (mesh-less) types."""
    norm, state = eqx.nn.make_with_state(eqxnorm.BatchNorm)(4, "batch", momentum=0.5, impl=impl)
    params, static = eqx.partition(_with_params(norm, seed=1), eqx.is_inexact_array)

    def fn(params, x):
        step = jax.vmap(
            eqx.combine(params, static), axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )
        y, new_state = step(x, state)
        return y, new_state.get(norm.running_index)

    return fn, params, (_data((BATCH, 4, 3, 5), seed=0),)


def _gated_rms_norm(impl):
    layer = eqxnorm.GatedRMSNorm(24, norm_before_gate=False, impl=impl)
    layer = eqx.tree_at(lambda m: m.weight, layer, ks.params(24, seed=1)[0])
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def fn(params, x, z):
        return jax.vmap(eqx.combine(params, static))(x, z)

    return fn, params, (_data((BATCH, 24), 0), _data((BATCH, 24), 2))


def _qk_norm(impl):
    layer = eqxnorm.QKNorm(3, 16, kv_heads=2, per_head=True, impl=impl)
    weights = (ks.params(16, seed=s)[0] for s in (1, 2))
    weights = (
        jnp.broadcast_to(w, s.shape)
        for w, s in zip(weights, (layer.q_weight, layer.k_weight), strict=True)
    )
    layer = eqx.tree_at(lambda m: (m.q_weight, m.k_weight), layer, tuple(weights))
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def fn(params, q, k):
        return eqx.combine(params, static)(q, k)

    return fn, params, (_data((BATCH, 5, 3, 16), 0), _data((BATCH, 5, 2, 16), 2))


LAYERS = {
    "layer_norm": _module_case(lambda impl: eqxnorm.LayerNorm(24, impl=impl), (24,)),
    "rms_norm": _module_case(lambda impl: eqxnorm.RMSNorm(24, impl=impl), (24,)),
    "group_norm": _module_case(lambda impl: eqxnorm.GroupNorm(2, 4, impl=impl), (4, 3, 5)),
    "instance_norm": _module_case(
        lambda impl: eqxnorm.InstanceNorm(4, channelwise_affine=True, impl=impl), (4, 3, 5)
    ),
    "batch_norm": _batch_norm,
    "batch_norm_module": _batch_norm_module,
    # A multi-axis example: its rows must not merge the (split) batch axis with another.
    "layer_norm_2d": _module_case(lambda impl: eqxnorm.LayerNorm((4, 6), impl=impl), (4, 6)),
    "weight_standardization": _weight_standardization,
    "add_layer_norm": _add_layer_norm,
    "adaptive_layer_norm": _adaptive_layer_norm,
    "gated_rms_norm": _gated_rms_norm,
    "dyt": _module_case(lambda impl: eqxnorm.DyT(24, impl=impl), (24,)),
    "qk_norm": _qk_norm,
}


@functools.cache
def _single_device(layer):
    """The reference's outputs and gradients on one device: once per layer, whatever the
    impl and the sharding compared with it."""
    fn, params, inputs = LAYERS[layer]("reference")
    return jax.jit(ks.outputs_and_grads(fn))(params, *inputs)


def _assert_tree_matches(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        if jnp.issubdtype(a.dtype, jnp.floating):
            ks.assert_matches(a, e)
        else:
            np.testing.assert_array_equal(a, e)


def _all_gathers(compiled_text):
    return [line.strip() for line in compiled_text.splitlines() if " all-gather(" in line]


def _sharded_run(layer, impl, mesh):
    """The layer's outputs and gradients under `jit`, its inputs sharded over the batch on
    `mesh`, and the all-gathers of the compiled program."""
    fn, params, inputs = LAYERS[layer](impl)
    batch = NamedSharding(mesh, P("batch"))
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    inputs = tuple(jax.device_put(i, batch) for i in inputs)
    compiled = jax.jit(ks.outputs_and_grads(fn)).lower(params, *inputs).compile()
    out, grads = compiled(params, *inputs)
    # The output stays split over the batch.
    assert jax.tree.leaves(out)[0].sharding.spec[0] == "batch"
    return (out, grads), _all_gathers(compiled.as_text())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_jit_batch_sharded_equals_single_device(layer, impl):
    result, gathers = _sharded_run(layer, impl, _mesh())
    _assert_tree_matches(result, _single_device(layer))
    # Each device normalizes its own rows: nothing the size of x is gathered (the kernels
    # would be replicated, each device gathering the whole batch, without their rules).
    assert gathers == []


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "layer",
    [
        "layer_norm",
        "layer_norm_2d",
        "group_norm",
        "instance_norm",
        "batch_norm",
        "batch_norm_module",
        "add_layer_norm",
    ],
)
def test_jit_explicit_mesh_equals_single_device(layer, impl):
    # `jax.make_mesh`'s default in JAX 0.10: the shardings are part of the types.
    mesh = _mesh(AxisType.Explicit)
    assert mesh.axis_types == (AxisType.Explicit,)
    result, gathers = _sharded_run(layer, impl, mesh)
    _assert_tree_matches(result, _single_device(layer))
    assert gathers == []


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", ["rms_norm", "group_norm"])
def test_shard_map_equals_single_device(layer, impl):
    fn, params, inputs = LAYERS[layer](impl)
    # Pallas kernels carry no varying-axes types in JAX 0.10 (and its interpreter fails on
    # them): inside `shard_map`, they need `check_vma=False` (README "Many devices").
    check_vma = impl == "reference"

    def local(params, x):
        out, (dparams, dx) = ks.outputs_and_grads(fn)(params, x)
        # The parameters enter replicated: their gradient is summed over the devices (by
        # the transpose of the implicit broadcast when varying axes are checked).
        return out, (dparams if check_vma else jax.lax.psum(dparams, "batch"), dx)

    sharded = jax.shard_map(
        local,
        mesh=_mesh(),
        in_specs=(P(), P("batch")),
        out_specs=(P("batch"), (P(), P("batch"))),
        check_vma=check_vma,
    )
    _assert_tree_matches(jax.jit(sharded)(params, *inputs), _single_device(layer))


# --- BatchNorm pooled across devices -----------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_norm_pools_across_devices(impl):
    x = _data((BATCH, 4, 3), seed=0)
    make = functools.partial(eqx.nn.make_with_state(eqxnorm.BatchNorm), 4, momentum=0.5, impl=impl)
    single, single_state = make("batch")
    y, state = jax.vmap(single, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, single_state
    )
    expected = (y, jax.tree.leaves(state))

    # pmap: one device per example group, the statistics pooled over "device" and "batch".
    pooled, pooled_state = make(("device", "batch"))

    def step(x, state):
        over_batch = jax.vmap(pooled, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        return over_batch(x, state)

    y_pmap, state_pmap = jax.pmap(step, axis_name="device", in_axes=(0, None), out_axes=(0, None))(
        x.reshape(DEVICES, -1, *x.shape[1:]), pooled_state
    )
    _assert_tree_matches((y_pmap.reshape(x.shape), jax.tree.leaves(state_pmap)), expected)

    # shard_map over the same devices; check_vma=False: JAX 0.10.2 refuses a collective over a
    # vmap axis inside shard_map otherwise (see README "BatchNorm conventions").
    mesh = _mesh(name="device")
    sharded_step = jax.shard_map(
        step, mesh=mesh, in_specs=(P("device"), P()), out_specs=(P("device"), P()), check_vma=False
    )
    y_shmap, state_shmap = jax.jit(sharded_step)(
        jax.device_put(x, NamedSharding(mesh, P("device"))), pooled_state
    )
    _assert_tree_matches((y_shmap, jax.tree.leaves(state_shmap)), expected)


# --- feature-sharded LayerNorm / RMSNorm (tensor parallelism) ---------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("function", [F.layer_norm, F.rms_norm])
def test_feature_sharded_equals_unsharded(function, impl):
    mesh = _mesh(name="model")
    x = _data((6, 3, 32), seed=0)
    params = ks.params(32, seed=1)

    def fn(params, x, axis_name=None):
        return function(x, *params, axis_name=axis_name, impl=impl)

    split = jax.shard_map(
        ks.outputs_and_grads(functools.partial(fn, axis_name="model")),
        mesh=mesh,
        in_specs=(P("model"), P(None, None, "model")),
        out_specs=(P(None, None, "model"), (P("model"), P(None, None, "model"))),
    )
    expected = jax.jit(ks.outputs_and_grads(fn))(params, x)
    _assert_tree_matches(jax.jit(split)(params, x), expected)


@pytest.mark.parametrize("module", [eqxnorm.LayerNorm, eqxnorm.RMSNorm])
def test_feature_sharded_module_equals_unsharded(module):
    x = _data((6, 32), seed=0)
    whole = _with_params(module(32), seed=1)
    split_norm = _with_params(module(32, axis_name="model"), seed=1)
    mesh = _mesh(name="model")
    # The module holds the whole parameters; each device gets its slice of them and of x.
    split = jax.shard_map(
        lambda norm, x: jax.vmap(norm)(x),
        mesh=mesh,
        in_specs=(P("model"), P(None, "model")),
        out_specs=P(None, "model"),
    )
    ks.assert_matches(jax.jit(split)(split_norm, x), jax.vmap(whole)(x))
    # `add_and_norm` too (the sum, then the pooled norm).
    residual = _data((6, 32), seed=2)
    split_add = jax.shard_map(
        lambda norm, x, r: jax.vmap(norm.add_and_norm)(x, r),
        mesh=mesh,
        in_specs=(P("model"), P(None, "model"), P(None, "model")),
        out_specs=P(None, "model"),
    )
    expected = jax.vmap(whole.add_and_norm)(x, residual)
    _assert_tree_matches(jax.jit(split_add)(split_norm, x, residual), expected)


def test_unbound_axis_name_is_a_clear_error():
    x = _data((2, 8), seed=0)
    with pytest.raises(ValueError, match="named axis 'model', but no enclosing transformation"):
        F.layer_norm(x, axis_name="model")
    with pytest.raises(ValueError, match="named axis 'model', but no enclosing transformation"):
        eqxnorm.RMSNorm(8, axis_name="model")(x[0])


def test_feature_sharded_module_rejects_an_uneven_slice():
    norm = eqxnorm.LayerNorm(32, axis_name="model")
    with pytest.raises(ValueError, match=r"equal slice of one axis of \(32,\)"):
        jax.vmap(norm, axis_name="model")(_data((4, 7), seed=0))


# --- the partitioning machinery ---------------------------------------------------------------


def _normalize_call(rule):
    def call(x, shift, offset, scale, bias):
        return c.per_platform(
            bn_kernels._normalize_on, x, shift, offset, scale, bias, sharding=rule
        )

    return call


def test_rule_keeps_a_kernel_local_and_its_absence_gathers():
    mesh = _mesh()
    x = jax.device_put(_data((BATCH, 4, 15), seed=0), NamedSharding(mesh, P("batch")))
    channels = [jnp.full((4,), v, jnp.float32) for v in (0.5, 0.1, 2.0, -1.0)]
    texts = {}
    for name, rule in (("gathered", None), ("local", bn_kernels._NORMALIZE)):
        jitted = jax.jit(_normalize_call(rule))
        texts[name] = jitted.lower(x, *channels).compile().as_text()
        expected = ((x - 0.5) - 0.1) * 2.0 - 1.0
        ks.assert_matches(jitted(x, *channels), expected)
    # The check of the tests above can fail: an unpartitioned kernel gathers its input.
    assert _all_gathers(texts["gathered"])
    assert not _all_gathers(texts["local"])


def test_rule_must_name_every_operand():
    x = _data((BATCH, 4, 15), seed=0)
    with pytest.raises(ValueError, match="names 2 operands, but the kernel call has 5"):
        _normalize_call(c.Rule("b c s, c -> b c s", split="b"))(x, *([jnp.ones(4)] * 4))
    with pytest.raises(ValueError, match=r"names the axes \(b c\) for an operand of shape"):
        _normalize_call(c.Rule("b c, c, c, c, c -> b c s", split="b"))(x, *([jnp.ones(4)] * 4))


def test_vmapped_call_is_partitioned_over_the_vmapped_axis():
    # A `vmap` the kernels' folds do not absorb (a call vmapped directly): the vmapped axis
    # is split instead.
    mesh = _mesh()
    x = jax.device_put(_data((BATCH, 2, 4, 3), seed=0), NamedSharding(mesh, P("batch")))
    channels = [jnp.full((4,), v, jnp.float32) for v in (0.5, 0.1, 2.0, -1.0)]
    vmapped = jax.jit(jax.vmap(_normalize_call(bn_kernels._NORMALIZE), (0, None, None, 0, None)))
    scale = jnp.linspace(1.0, 2.0, BATCH * 4).reshape(BATCH, 4)
    args = (x, channels[0], channels[1], scale, channels[3])
    expected = ((x - 0.5) - 0.1) * scale[:, None, :, None] - 1.0
    ks.assert_matches(vmapped(*args), expected)
    assert not _all_gathers(vmapped.lower(*args).compile().as_text())


def test_uneven_batch_is_gathered_and_correct():
    # 12 examples on 8 devices: not split (each device gathers them), still correct.
    mesh = _mesh()
    x = _data((12, 4, 15), seed=0)
    channels = [jnp.full((4,), v, jnp.float32) for v in (0.5, 0.1, 2.0, -1.0)]

    def fn(x, *channels):
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("batch")))
        return _normalize_call(bn_kernels._NORMALIZE)(x, *channels)

    ks.assert_matches(jax.jit(fn)(x, *channels), ((x - 0.5) - 0.1) * 2.0 - 1.0)


def test_optional_factor_rule():
    rule = c.Rule("b c s, b? c -> b c s", split="b")
    per_channel = rule.resolve([jnp.zeros((2, 3, 4)), jnp.zeros(3)])
    per_example = rule.resolve([jnp.zeros((2, 3, 4)), jnp.zeros((2, 3))])
    assert per_channel.sides() == ([("b", "c", "s"), ("c",)], [("b", "c", "s")])
    assert per_example.sides() == ([("b", "c", "s"), ("b", "c")], [("b", "c", "s")])
    assert np.array_equal(per_example.vmapped([True, False]).split.split(), ["vmap0", "b"])


def _two_factor_call(axis_type):
    """Operands `q (8, 3)` split over mesh axis `a` (2 devices) and `k (8, 3)` over `b` (4)."""
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(axis_type,) * 2)
    q = jax.device_put(_data((8, 3), seed=0), NamedSharding(mesh, P("a")))
    k = jax.device_put(_data((8, 3), seed=1), NamedSharding(mesh, P("b")))
    return q, k


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_rule_marks_independent_outputs_and_sums(axis_type):
    # Unmarked, `q d` lacking `k` read as a sum over `k` was multiplied by `k`'s 4 shards.
    q, k = _two_factor_call(axis_type)

    def both(q, k):
        return q * 2.0, k + 1.0

    independent = c.partitioned(both, c.Rule("q d, k d -> q d ~k, k d ~q", split="q k"))
    out_q, out_k = jax.jit(independent)(q, k)
    ks.assert_matches(out_q, q * 2.0)
    ks.assert_matches(out_k, k + 1.0)

    def dot(q, k):
        return q * k.sum(0, keepdims=True)

    summed = c.partitioned(dot, c.Rule("q d, k d -> q d +k", split="q k"))
    ks.assert_matches(jax.jit(summed)(q, k), q * k.sum(0, keepdims=True))


def test_rule_with_an_ambiguous_output_raises():
    q, k = _two_factor_call(AxisType.Auto)
    with pytest.raises(ValueError, match=r"a sum over 'k' \(end its entry with `\+k`\)"):
        c.partitioned(lambda q, k: (q, k), c.Rule("q d, k d -> q d, k d", split="q k"))(q, k)
    with pytest.raises(ValueError, match="marks 'd' on the output"):
        c.partitioned(lambda q, k: q, c.Rule("q d, k d -> q +d", split="q k"))(q, k)
