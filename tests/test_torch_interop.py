"""eqxnorm.load_torch_state_dict and eqxnorm.torch_state_dict.

The mapping tests run on NumPy arrays and never import PyTorch. The tests against `torch.nn`
import it with `pytest.importorskip` (the CI installs it): a PyTorch layer's state dict loaded
into eqxnorm gives PyTorch's eval output, and an exported eqxnorm layer loaded into PyTorch
gives eqxnorm's output.
"""

import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqxnorm
import oracle

EPS = 1e-5
OVER_BATCH = dict(axis_name="batch", in_axes=(0, None), out_axes=(0, None))
BN_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]

load = eqxnorm.load_torch_state_dict
export = eqxnorm.torch_state_dict


# Jitted: one compilation per layer structure and shape, instead of one per primitive.
@eqx.filter_jit
def _apply(norm, x):
    return jax.vmap(norm)(x)


@eqx.filter_jit
def _infer(bn, state, x):
    return jax.vmap(eqx.nn.inference_mode(bn), **OVER_BATCH)(x, state)[0]


@eqx.filter_jit
def _train(bn, state, x):
    return jax.vmap(bn, **OVER_BATCH)(x, state)


def _affine_dict(seed, shape, prefix=""):
    """A random float64 `weight` (around 1) and `bias` of `shape`, as PyTorch names them."""
    rng = np.random.default_rng(seed)
    return {
        prefix + "weight": 1 + 0.5 * rng.standard_normal(shape),
        prefix + "bias": rng.standard_normal(shape),
    }


def _bn_dict(seed, channels, count, affine=True):
    rng = np.random.default_rng(seed)
    entries = _affine_dict(seed, (channels,)) if affine else {}
    entries["running_mean"] = rng.standard_normal(channels)
    entries["running_var"] = rng.uniform(0.5, 2.0, channels)
    entries["num_batches_tracked"] = np.asarray(count, dtype=np.int64)
    return entries


def _make_bn(channels, **kwargs):
    return eqx.nn.make_with_state(eqxnorm.BatchNorm)(channels, "batch", **kwargs)


def _input(seed, shape, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


# --- the mapping, on NumPy arrays ------------------------------------------------------------


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: eqxnorm.LayerNorm((3, 4)), (3, 4)),
        (lambda: eqxnorm.GroupNorm(2, 4), (4,)),
        (lambda: eqxnorm.InstanceNorm(4, channelwise_affine=True), (4,)),
    ],
    ids=["layer_norm", "group_norm", "instance_norm"],
)
def test_weight_and_bias_map_both_ways(make, shape):
    layer = make()
    entries = _affine_dict(0, shape)
    loaded = load(layer, entries)
    for name in ("weight", "bias"):
        value = getattr(loaded, name)
        assert value.dtype == jnp.float32
        np.testing.assert_array_equal(value, entries[name].astype(np.float32))
    # A new layer; the given one keeps its initial ones and zeros.
    np.testing.assert_array_equal(layer.weight, np.ones(shape))
    np.testing.assert_array_equal(layer.bias, np.zeros(shape))
    exported = export(loaded)
    assert list(exported) == ["weight", "bias"]
    for name, value in exported.items():
        assert type(value) is np.ndarray and value.dtype == np.float32 and value.shape == shape
        np.testing.assert_array_equal(value, entries[name].astype(np.float32))


def test_layer_norm_affine_flags():
    no_bias = load(eqxnorm.LayerNorm(6, use_bias=False), {"weight": np.full(6, 2.0)})
    np.testing.assert_array_equal(no_bias.weight, np.full(6, 2.0))
    assert no_bias.bias is None and list(export(no_bias)) == ["weight"]
    plain = eqxnorm.LayerNorm(6, use_weight=False, use_bias=False)
    assert load(plain, {}) == plain and export(plain) == {}
    # torch.nn.LayerNorm has no bias without a weight: loading sets it to zeros, and only a
    # zero bias exports.
    bias_only = eqx.tree_at(
        lambda n: n.bias, eqxnorm.LayerNorm(6, use_weight=False), jnp.full(6, 3.0)
    )
    reset = load(bias_only, {})
    np.testing.assert_array_equal(reset.bias, np.zeros(6))
    assert export(reset) == {}
    with pytest.raises(ValueError, match="nonzero bias.*no bias without a weight.*use_weight"):
        export(bias_only)


def test_rms_norm_has_no_bias():
    weight = np.linspace(0.5, 1.5, 5)
    biased = eqx.tree_at(lambda n: n.bias, eqxnorm.RMSNorm(5), jnp.full(5, 3.0))
    loaded = load(biased, {"weight": weight})
    np.testing.assert_array_equal(loaded.weight, weight.astype(np.float32))
    np.testing.assert_array_equal(loaded.bias, np.zeros(5))
    assert list(export(loaded)) == ["weight"]
    with pytest.raises(ValueError, match="nonzero bias.*torch.nn.RMSNorm has no bias.*use_bias"):
        export(biased)
    bias_free = load(eqxnorm.RMSNorm(5, use_bias=False), {"weight": weight})
    assert bias_free.bias is None
    np.testing.assert_array_equal(export(bias_free)["weight"], weight.astype(np.float32))


def test_prefix_selects_one_layer_of_a_model():
    model = {
        **_affine_dict(1, (4,), "encoder.norm."),
        **_affine_dict(2, (4,), "decoder.norm."),
        # Outside the prefix: ignored even though no layer here has a place for it.
        "decoder.linear.weight": np.zeros((4, 4)),
    }
    loaded = load(eqxnorm.GroupNorm(2, 4), model, prefix="decoder.norm.")
    np.testing.assert_array_equal(loaded.weight, model["decoder.norm.weight"].astype(np.float32))
    np.testing.assert_array_equal(loaded.bias, model["decoder.norm.bias"].astype(np.float32))
    exported = export(loaded, prefix="decoder.norm.")
    assert list(exported) == ["decoder.norm.weight", "decoder.norm.bias"]


def test_batch_norm_statistics_and_count():
    channels, count = 3, 7
    entries = _bn_dict(3, channels, count)
    bn, state = _make_bn(channels, momentum=0.9)
    new_bn, new_state = load(bn, entries, state)
    mean, var = new_state.get(new_bn.running_index)
    np.testing.assert_array_equal(mean, entries["running_mean"].astype(np.float32))
    np.testing.assert_array_equal(var, entries["running_var"].astype(np.float32))
    loaded_count = new_state.get(new_bn.count_index)
    assert loaded_count.dtype == jnp.int32 and int(loaded_count) == count
    # The given state is still valid and unchanged.
    assert int(state.get(bn.count_index)) == 0
    np.testing.assert_array_equal(state.get(bn.running_index)[0], np.zeros(channels))
    # Inference normalizes with the loaded statistics as PyTorch's eval mode does.
    x = _input(4, (5, channels, 2, 3))
    shape = (1, channels, 1, 1)
    expected = (x - entries["running_mean"].reshape(shape)) / np.sqrt(
        entries["running_var"].reshape(shape) + EPS
    ) * entries["weight"].reshape(shape) + entries["bias"].reshape(shape)
    oracle.assert_close(_infer(new_bn, new_state, x), expected, jnp.float32)
    exported = export(new_bn, new_state)
    assert list(exported) == BN_KEYS
    tracked = exported["num_batches_tracked"]
    assert tracked.dtype == np.int64 and tracked.shape == () and int(tracked) == count
    for name in BN_KEYS[:4]:
        np.testing.assert_array_equal(exported[name], entries[name].astype(np.float32))


def test_batch_norm_in_a_model_state():
    class Model(eqx.Module):
        first: eqxnorm.BatchNorm
        second: eqxnorm.BatchNorm

        def __init__(self):
            self.first = eqxnorm.BatchNorm(2, "batch")
            self.second = eqxnorm.BatchNorm(3, "batch", channelwise_affine=False)

    model, state = eqx.nn.make_with_state(Model)()
    entries = {f"second.{k}": v for k, v in _bn_dict(5, 3, 4, affine=False).items()}
    entries |= {f"first.{k}": v for k, v in _bn_dict(6, 2, 9).items()}
    second, state = load(model.second, entries, state, prefix="second.")
    np.testing.assert_array_equal(
        state.get(second.running_index)[1], entries["second.running_var"].astype(np.float32)
    )
    assert int(state.get(second.count_index)) == 4
    # The other layer's statistics are untouched.
    assert int(state.get(model.first.count_index)) == 0
    np.testing.assert_array_equal(state.get(model.first.running_index)[1], np.ones(2))
    assert list(export(second, state, prefix="second.")) == [
        "second.running_mean",
        "second.running_var",
        "second.num_batches_tracked",
    ]


def test_casts_to_the_layers_dtypes():
    half = load(
        eqxnorm.LayerNorm(4, dtype=jnp.float16), {"weight": [1, 2, 3, 4], "bias": 0.5 * np.ones(4)}
    )
    assert half.weight.dtype == half.bias.dtype == jnp.float16
    np.testing.assert_array_equal(half.weight, [1, 2, 3, 4])
    bn, state = _make_bn(2, dtype=jnp.float16)
    bn, state = load(bn, {k: jnp.asarray(v) for k, v in _bn_dict(7, 2, 1).items()}, state)
    assert bn.weight.dtype == jnp.float16
    assert state.get(bn.running_index)[0].dtype == jnp.float32
    # NumPy-only bfloat16 is exported as float32, which holds it exactly and PyTorch reads.
    bf16 = eqxnorm.LayerNorm(3, dtype=jnp.bfloat16)
    assert {v.dtype for v in export(bf16).values()} == {np.dtype(np.float32)}


def test_parameters_load_into_grad_and_jit():
    """A loaded layer is an ordinary layer: jitted and differentiated like a fresh one."""
    norm = load(eqxnorm.LayerNorm(4), _affine_dict(8, (4,)))
    grads = eqx.filter_grad(lambda n, x: jnp.sum(_apply(n, x) ** 2))(norm, _input(9, (3, 4)))
    assert grads.weight.shape == (4,) and bool(jnp.all(jnp.isfinite(grads.weight)))
    assert float(jnp.abs(grads.bias).sum()) > 0


def test_library_does_not_import_torch(tmp_path):
    script = (
        "import sys\n"
        "import numpy as np\n"
        "import eqxnorm\n"
        "norm = eqxnorm.load_torch_state_dict(eqxnorm.LayerNorm(2), "
        "{'weight': np.ones(2), 'bias': np.zeros(2)})\n"
        "eqxnorm.torch_state_dict(norm)\n"
        "print('torch' in sys.modules)\n"
    )
    # From tmp_path, so the repository root does not shadow the installed package.
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# --- errors ----------------------------------------------------------------------------------


def test_unsupported_layer():
    with pytest.raises(TypeError, match=r"type equinox.*LayerNorm.*supported.*eqxnorm\.RMSNorm"):
        load(eqx.nn.LayerNorm(4), {})
    ws = eqxnorm.WeightStandardization(eqx.nn.Linear(2, 2, key=jax.random.key(0)))
    with pytest.raises(TypeError, match="WeightStandardization, which has no PyTorch mapping"):
        export(ws)


def test_missing_keys():
    with pytest.raises(
        ValueError,
        match=r"loads the keys \['weight', 'bias'\], but the state dict lacks \['bias'\]\. "
        r"Keys present: \['weight'\]\..*use_bias=False",
    ):
        load(eqxnorm.LayerNorm(4), {"weight": np.ones(4)})
    with pytest.raises(ValueError, match=r"lacks \['weight', 'bias'\].*channelwise_affine=False"):
        load(eqxnorm.GroupNorm(2, 4), {})
    under_norm = _affine_dict(0, (4,), "norm.")
    for prefix in ("", "norm", "layers.norm."):
        with pytest.raises(ValueError, match=r"another prefix: pass `prefix='norm\.'`"):
            load(eqxnorm.InstanceNorm(4, channelwise_affine=True), under_norm, prefix=prefix)
    bn, state = _make_bn(3)
    with pytest.raises(ValueError, match="track_running_stats=False.*inference=False"):
        load(bn, _affine_dict(0, (3,)), state)
    old = _bn_dict(0, 3, 2)
    del old["num_batches_tracked"]
    with pytest.raises(ValueError, match=r"lacks \['num_batches_tracked'\].*before PyTorch 0\.4"):
        load(bn, old, state)


def test_unexpected_keys():
    entries = {**_affine_dict(0, (4,)), "running_mean": np.zeros(4)}
    under_norm = _affine_dict(0, (4,), "norm.")
    with pytest.raises(
        ValueError, match=r"unexpected key\(s\) \['running_mean'\].*Pass `strict=False`"
    ):
        load(eqxnorm.LayerNorm(4), entries)
    loaded = load(eqxnorm.LayerNorm(4), entries, strict=False)
    np.testing.assert_array_equal(loaded.bias, entries["bias"].astype(np.float32))
    with pytest.raises(ValueError, match=r"\['norm\.extra'\] under the prefix 'norm\.'"):
        load(
            eqxnorm.LayerNorm(4),
            under_norm | {"norm.extra": 1.0, "other.x": 1.0},
            prefix="norm.",
            strict=True,
        )
    with pytest.raises(ValueError, match="construct this layer with `channelwise_affine=True`"):
        load(eqxnorm.GroupNorm(2, 4, channelwise_affine=False), _affine_dict(0, (4,)))
    with pytest.raises(ValueError, match="construct this layer with `use_weight=True`"):
        load(eqxnorm.LayerNorm(4, use_weight=False, use_bias=False), {"weight": np.ones(4)})
    with pytest.raises(ValueError, match=r"torch\.nn\.RMSNorm has no bias"):
        load(eqxnorm.RMSNorm(4), _affine_dict(0, (4,)))
    with pytest.raises(ValueError, match=r"whole model's state dict.*prefix='block\.0\.'"):
        load(eqxnorm.LayerNorm(4, use_weight=False, use_bias=False), {"block.0.weight": 1.0})


def test_instance_norm_running_statistics_are_refused():
    norm = eqxnorm.InstanceNorm(3, channelwise_affine=True)
    entries = _bn_dict(1, 3, 5)
    with pytest.raises(
        ValueError, match="unexpected.*'running_mean'.*track_running_stats=True.*own statistics"
    ):
        load(norm, entries)
    loaded = load(norm, entries, strict=False)
    np.testing.assert_array_equal(loaded.weight, entries["weight"].astype(np.float32))


def test_shape_mismatch():
    with pytest.raises(
        ValueError,
        match=r"`weight` has shape \(5,\), but eqxnorm\.LayerNorm\(4, .*\) expects shape "
        r"\(4,\) for it\. .*normalized_shape, e\.g\. `eqxnorm\.LayerNorm\(5\)`",
    ):
        load(eqxnorm.LayerNorm(4), _affine_dict(0, (5,)))
    with pytest.raises(
        ValueError, match=r"`gn\.bias` has shape \(6,\).*`eqxnorm\.GroupNorm\(groups, channels=6\)`"
    ):
        load(
            eqxnorm.GroupNorm(2, 4), {"gn.weight": np.ones(4), "gn.bias": np.ones(6)}, prefix="gn."
        )
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*one value per channel"):
        load(eqxnorm.InstanceNorm(4, channelwise_affine=True), _affine_dict(0, (2, 2)))
    bn, state = _make_bn(3)
    entries = _bn_dict(0, 3, 2) | {"num_batches_tracked": np.array([2])}
    with pytest.raises(ValueError, match=r"`num_batches_tracked` has shape \(1,\).*scalar"):
        load(bn, entries, state)


def test_bad_values():
    bn, state = _make_bn(3)
    for count in (-1, 2.5, 2**31):
        with pytest.raises(ValueError, match=f"whole number of steps.*got {count}"):
            load(bn, _bn_dict(0, 3, 0) | {"num_batches_tracked": np.asarray(count)}, state)
    for value in (np.ones(4, dtype=bool), np.ones(4, dtype=np.complex64), np.array(["a"] * 4)):
        with pytest.raises(TypeError, match=f"`bias` must hold real numbers.*{value.dtype}"):
            load(eqxnorm.LayerNorm(4), {"weight": np.ones(4), "bias": value})


def test_batch_norm_needs_its_state():
    bn, state = _make_bn(3)
    with pytest.raises(ValueError, match="`state` is needed, but got state=None"):
        load(bn, _bn_dict(0, 3, 1))
    with pytest.raises(ValueError, match="`state` is needed, but got state=None"):
        export(bn)
    with pytest.raises(ValueError, match=r"holds running statistics of shape \(5,\)"):
        export(bn, _make_bn(5)[1])
    model, model_state = eqx.nn.make_with_state(lambda: [eqxnorm.BatchNorm(3, "batch")])()
    with pytest.raises(ValueError, match="does not hold the running statistics"):
        export(bn, model_state)
    with pytest.raises(ValueError, match="does not hold the running statistics"):
        load(model[0], _bn_dict(0, 3, 1), state)
    with pytest.raises(TypeError, match="must be an `eqx.nn.State`.*dict"):
        load(bn, _bn_dict(0, 3, 1), {})


def test_bad_arguments():
    with pytest.raises(TypeError, match="`state_dict` must be a mapping.*list"):
        load(eqxnorm.LayerNorm(4), [np.ones(4), np.zeros(4)])
    with pytest.raises(TypeError, match="`prefix` must be a string"):
        export(eqxnorm.LayerNorm(4), prefix=0)
    with pytest.raises(TypeError, match="keys must be strings.*got the key 0"):
        load(eqxnorm.LayerNorm(4), {0: np.ones(4)})


# --- against torch.nn ------------------------------------------------------------------------


def _torch_cases(torch):
    """(torch layer factory, eqxnorm layer factory, input shape) per supported layer."""
    nn = torch.nn
    return {
        "layer_norm": (lambda: nn.LayerNorm((4, 5)), lambda: eqxnorm.LayerNorm((4, 5)), (6, 4, 5)),
        "layer_norm_no_bias": (
            lambda: nn.LayerNorm(7, bias=False),
            lambda: eqxnorm.LayerNorm(7, use_bias=False),
            (6, 7),
        ),
        "rms_norm": (
            lambda: nn.RMSNorm((4, 5), eps=EPS),
            lambda: eqxnorm.RMSNorm((4, 5), use_bias=False),
            (6, 4, 5),
        ),
        "rms_norm_equinox_default_bias": (
            lambda: nn.RMSNorm(7, eps=EPS),
            lambda: eqxnorm.RMSNorm(7),
            (6, 7),
        ),
        "group_norm": (lambda: nn.GroupNorm(2, 6), lambda: eqxnorm.GroupNorm(2, 6), (6, 6, 5)),
        "instance_norm_1d": (
            lambda: nn.InstanceNorm1d(3, affine=True),
            lambda: eqxnorm.InstanceNorm(3, channelwise_affine=True),
            (4, 3, 7),
        ),
        "instance_norm_3d": (
            lambda: nn.InstanceNorm3d(3, affine=True),
            lambda: eqxnorm.InstanceNorm(3, channelwise_affine=True),
            (2, 3, 3, 4, 5),
        ),
        "instance_norm_no_affine": (
            lambda: nn.InstanceNorm2d(3),
            lambda: eqxnorm.InstanceNorm(3),
            (4, 3, 4, 5),
        ),
    }


def _randomize_torch(torch, module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.5 * noise if name == "weight" else noise)
    return module


def _randomize(layer, seed):
    """`layer` with random values in the parameters PyTorch's twin holds."""
    rng = np.random.default_rng(seed)
    names = [n for n in ("weight", "bias") if getattr(layer, n) is not None]
    if isinstance(layer, eqxnorm.RMSNorm):
        names = [n for n in names if n != "bias"]
    values = [
        jnp.asarray(
            (n == "weight") + 0.5 * rng.standard_normal(getattr(layer, n).shape), jnp.float32
        )
        for n in names
    ]
    return eqx.tree_at(lambda m: tuple(getattr(m, n) for n in names), layer, values)


def _torch_eval(torch, module, x):
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _to_torch(torch, entries):
    return {k: torch.from_numpy(v) for k, v in entries.items()}


@pytest.mark.parametrize(
    "case",
    [
        "layer_norm",
        "layer_norm_no_bias",
        "rms_norm",
        "rms_norm_equinox_default_bias",
        "group_norm",
        "instance_norm_1d",
        "instance_norm_3d",
        "instance_norm_no_affine",
    ],
)
def test_matches_torch(case):
    torch = pytest.importorskip("torch")
    make_torch, make_ours, shape = _torch_cases(torch)[case]
    x = _input(10, shape)
    theirs = _randomize_torch(torch, make_torch(), seed=11)
    ours = load(make_ours(), {k: v.numpy() for k, v in theirs.state_dict().items()})
    np.testing.assert_allclose(_apply(ours, x), _torch_eval(torch, theirs, x), rtol=1e-5, atol=1e-5)
    # And back: a random eqxnorm layer, exported, computes the same in PyTorch.
    ours = _randomize(make_ours(), seed=12)
    fresh = make_torch()
    exported = export(ours)
    assert list(exported) == list(fresh.state_dict())
    fresh.load_state_dict(_to_torch(torch, exported))
    np.testing.assert_allclose(_torch_eval(torch, fresh, x), _apply(ours, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dims, shape, affine",
    [
        (1, (8, 3), True),
        (1, (8, 3, 5), False),
        (2, (8, 3, 4, 5), True),
        (3, (4, 3, 2, 3, 4), True),
    ],
)
def test_batch_norm_matches_torch(dims, shape, affine):
    torch = pytest.importorskip("torch")
    cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dims]
    channels, steps = shape[1], 3
    theirs = _randomize_torch(torch, cls(channels, eps=EPS, momentum=0.1, affine=affine), 13)
    theirs.train()
    with torch.no_grad():
        for step in range(steps):
            theirs(torch.from_numpy(_input(14 + step, shape, loc=step, scale=1.0 + step)))
    bn, state = _make_bn(channels, momentum=0.9, channelwise_affine=affine)
    bn, state = load(bn, {k: v.numpy() for k, v in theirs.state_dict().items()}, state)
    assert int(state.get(bn.count_index)) == steps
    x = _input(20, shape)
    np.testing.assert_allclose(
        _infer(bn, state, x), _torch_eval(torch, theirs, x), rtol=1e-5, atol=1e-5
    )
    # And back: an eqxnorm BatchNorm trained a few steps, exported, infers the same in PyTorch.
    ours, state = _make_bn(channels, momentum=0.9, channelwise_affine=affine)
    if affine:
        ours = _randomize(ours, seed=21)
    for step in range(steps):
        _, state = _train(ours, state, _input(22 + step, shape, loc=-step, scale=2.0 + step))
    fresh = cls(channels, eps=EPS, affine=affine)
    exported = export(ours, state)
    assert list(exported) == list(fresh.state_dict())
    fresh.load_state_dict(_to_torch(torch, exported))
    assert int(fresh.num_batches_tracked) == steps
    np.testing.assert_allclose(
        _torch_eval(torch, fresh, x), _infer(ours, state, x), rtol=1e-5, atol=1e-5
    )


def test_batch_norm_training_continues_as_documented():
    """After a load, eqxnorm's next update weighs the batch by (1 - m)/(1 - m^t), t =
    num_batches_tracked + 1: PyTorch's 1 - m once m^t is negligible."""
    torch = pytest.importorskip("torch")
    momentum, shape = 0.9, (4, 2, 3)
    x = _input(30, shape, loc=1.0)
    batch_mean = x.astype(np.float64).mean((0, 2))
    batch_var = x.astype(np.float64).var((0, 2), ddof=1)
    for steps in (3, 200):
        theirs = torch.nn.BatchNorm1d(2, eps=EPS, momentum=1 - momentum)
        theirs.train()
        with torch.no_grad():
            for step in range(steps):
                theirs(torch.from_numpy(_input(31 + step, shape, scale=1.5)))
        entries = {k: v.numpy().copy() for k, v in theirs.state_dict().items()}
        bn, state = _make_bn(2, momentum=momentum)
        bn, state = load(bn, entries, state)
        y, state = _train(bn, state, x)
        with torch.no_grad():
            y_torch = theirs(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
        assert int(state.get(bn.count_index)) == int(theirs.num_batches_tracked) == steps + 1
        weight = (1 - momentum) / (1 - momentum ** (steps + 1))
        mean, var = state.get(bn.running_index)
        for ours_stat, old, batch, torch_stat in (
            (mean, entries["running_mean"], batch_mean, theirs.running_mean),
            (var, entries["running_var"], batch_var, theirs.running_var),
        ):
            oracle.assert_close(ours_stat, (1 - weight) * old + weight * batch, jnp.float32)
            if steps == 200:
                oracle.assert_close(ours_stat, torch_stat.numpy(), jnp.float32)


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    theirs = _randomize_torch(torch, torch.nn.GroupNorm(2, 4), seed=40)
    # Parameters that require grad, as `state_dict(keep_vars=True)` gives them.
    ours = load(eqxnorm.GroupNorm(2, 4), theirs.state_dict(keep_vars=True))
    np.testing.assert_array_equal(ours.weight, theirs.weight.detach().numpy())
    # bfloat16 tensors (which NumPy cannot hold), into a bfloat16 layer and back.
    half = theirs.to(torch.bfloat16)
    ours = load(eqxnorm.GroupNorm(2, 4, dtype=jnp.bfloat16), half.state_dict())
    assert ours.weight.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(ours.bias, np.float32), half.bias.detach().float().numpy()
    )
    fresh = torch.nn.GroupNorm(2, 4).to(torch.bfloat16)
    fresh.load_state_dict(_to_torch(torch, export(ours)))
    assert torch.equal(fresh.weight, half.weight)


def _qwen3_next_gated_norm(torch, dim):
    """Hugging Face's `Qwen3NextRMSNormGated` (transformers 4.57), written out: its `weight`
    of ones, float32 statistics, the weight applied to the normalized value rounded to the
    input dtype, then the float32 silu gate."""

    class Qwen3NextRMSNormGated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(dim))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states, gate):
            input_dtype = hidden_states.dtype
            hidden_states = hidden_states.to(torch.float32)
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
            hidden_states = self.weight * hidden_states.to(input_dtype)
            hidden_states = hidden_states * torch.nn.functional.silu(gate.to(torch.float32))
            return hidden_states.to(input_dtype)

    return Qwen3NextRMSNormGated()


def test_gated_rms_norm_matches_qwen3_next():
    torch = pytest.importorskip("torch")
    theirs = _qwen3_next_gated_norm(torch, 16)
    with torch.no_grad():
        theirs.weight.copy_(torch.linspace(0.5, 1.5, 16))
    x, z = _input(10, (4, 16)), _input(11, (4, 16))
    ours = load(eqxnorm.GatedRMSNorm(16), {k: v.numpy() for k, v in theirs.state_dict().items()})
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x), torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(jax.vmap(ours)(x, z), expected, rtol=1e-5, atol=1e-5)
    assert list(export(ours)) == ["weight"]
    with pytest.raises(ValueError, match=r"GatedRMSNorm\(\(16,\).*expects shape \(16,\)"):
        load(eqxnorm.GatedRMSNorm(16), {"weight": np.ones(8, np.float32)})


# --- zero-centred weights (Gemma's RMSNorm) ------------------------------------------------


def _gemma_rms_norm(torch, dim, eps):
    """Hugging Face's `GemmaRMSNorm`, as `transformers` defines it: a zero-centred `weight`
    (initialised to zeros) applied as `1 + weight`, in float32."""

    class GemmaRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.eps = eps
            self.weight = torch.nn.Parameter(torch.zeros(dim))

        def forward(self, x):
            x32 = x.float()
            out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return (out * (1.0 + self.weight.float())).type_as(x)

    return GemmaRMSNorm()


def test_gemma_rms_norm_state_dict_both_ways():
    torch = pytest.importorskip("torch")
    x = _input(13, (6, 32))
    theirs = _gemma_rms_norm(torch, 32, 1e-6)
    with torch.no_grad():
        theirs.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(3))
    sd = {k: v.numpy() for k, v in theirs.state_dict().items()}
    gemma = eqxnorm.RMSNorm(32, eps=1e-6, use_bias=False, weight_offset=1.0)
    assert not np.any(np.asarray(gemma.weight))  # starts at zeros, as Gemma's
    ours = load(gemma, sd)
    np.testing.assert_array_equal(ours.weight, sd["weight"])
    np.testing.assert_allclose(_apply(ours, x), _torch_eval(torch, theirs, x), rtol=1e-5, atol=1e-5)
    # Into a plain RMSNorm, naming the checkpoint's convention: the weight becomes 1 + weight.
    plain = load(eqxnorm.RMSNorm(32, eps=1e-6, use_bias=False), sd, weight_offset=1.0)
    np.testing.assert_allclose(_apply(plain, x), _apply(ours, x), rtol=1e-6, atol=1e-6)
    # And back: Gemma's weight, or torch.nn.RMSNorm's 1 + weight.
    np.testing.assert_array_equal(export(ours)["weight"], sd["weight"])
    np.testing.assert_allclose(export(ours, weight_offset=0.0)["weight"], 1 + sd["weight"])
    with pytest.raises(ValueError, match="weight_offset=1.0 applies to LayerNorm and RMSNorm"):
        load(
            eqxnorm.GroupNorm(2, 4), {"weight": np.ones(4), "bias": np.zeros(4)}, weight_offset=1.0
        )
