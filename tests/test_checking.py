"""`eqxnorm._checking`: friendly prechecks run first, jaxtyping+beartype is the backstop."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float, TypeCheckError

import eqxnorm
from eqxnorm import _checking


def test_precheck_runs_before_the_annotation_check():
    calls = []

    def precheck(x):
        calls.append(x.shape)
        if x.ndim != 1:
            raise ValueError(f"friendly: got x.shape={x.shape}")

    @_checking.typechecked(precheck)
    def f(x: Float[Array, " dim"]) -> Float[Array, " dim"]:
        return x

    with pytest.raises(ValueError, match=r"friendly: got x.shape=\(2, 3\)"):
        f(jnp.ones((2, 3)))
    assert calls == [(2, 3)]


def test_annotations_are_enforced_as_the_backstop():
    @_checking.typechecked()
    def wrong_output(x: Float[Array, " dim"]) -> Float[Array, " dim"]:
        return jnp.concatenate([x, x])

    with pytest.raises(TypeCheckError, match="return"):
        wrong_output(jnp.ones(3))
    with pytest.raises(TypeCheckError):
        wrong_output(jnp.ones(3, jnp.int32))


def test_named_scope_keeps_the_function():
    @_checking.named_scope("eqxnorm.Test")
    def f(x):
        """doc"""
        return x + 1

    assert f(1) == 2 and f.__doc__ == "doc"


def test_axis_size_requires_a_bound_axis():
    with pytest.raises(ValueError, match=r"named axis 'batch'.*axis_name='batch'"):
        _checking.axis_size("batch", "here")


def test_check_example_shape_messages():
    check = _checking.check_example_shape
    check(jnp.ones((3, 4)), (3, 4), "L", ["a", "b"])
    with pytest.raises(ValueError, match=r"L normalizes a single example .*\(2, 3, 4\).*vmap"):
        check(jnp.ones((2, 3, 4)), (3, 4), "L", ["a", "b"])
    with pytest.raises(ValueError, match=r"axis 1 \(b\) has size 5 but 4 is expected"):
        check(jnp.ones((3, 5)), (3, 4), "L", ["a", "b"])


@pytest.mark.parametrize("eps", [0, -1e-5, float("inf"), float("nan")])
def test_check_eps_values(eps):
    with pytest.raises(ValueError, match="finite number greater than 0"):
        _checking.check_eps(eps, "L")


def test_check_eps_types():
    with pytest.raises(TypeError, match="must be a real number"):
        _checking.check_eps(True, "L")
    with pytest.raises(TypeError, match="must be a real number"):
        _checking.check_eps(jnp.asarray(1e-5), "L")


@pytest.mark.parametrize("eps", [1, np.float32(1e-3), np.float64(1e-3), np.int64(1)])
def test_eps_may_be_any_real_number(eps):
    """Issue 15: `LayerNorm(8, eps=1)` constructed, then every call raised beartype's bare
    TypeCheckError."""
    x = jnp.arange(16.0).reshape(2, 8)
    for layer in (
        eqxnorm.LayerNorm(8, eps=eps),
        eqxnorm.RMSNorm(8, eps=eps),
        eqxnorm.GroupNorm(2, 8, eps=eps),
    ):
        assert layer(x[0] if layer.__class__.__name__ != "GroupNorm" else x.T).shape
    assert eqxnorm.functional.layer_norm(x, eps=eps).shape == x.shape
    bn, state = eqx.nn.make_with_state(eqxnorm.BatchNorm)(8, "b", eps=eps)
    vmapped = jax.vmap(bn, axis_name="b", in_axes=(0, None), out_axes=(0, None))
    assert vmapped(x, state)[0].shape == x.shape


def test_eps_flushed_to_zero_in_float32_is_rejected():
    """`eps=1e-40` is finite and > 0 but 0 in float32 arithmetic: a constant slice gave NaN."""
    with pytest.raises(ValueError, match=r"smallest normal float32, 1\.17549"):
        eqxnorm.functional.layer_norm(jnp.ones((2, 8)), eps=1e-40)
    with pytest.raises(ValueError, match="eps >= "):
        eqxnorm.LayerNorm(8, eps=1e-40)(jnp.ones(8))


def test_batch_norm_state_none_is_a_sentence():
    bn, _ = eqx.nn.make_with_state(eqxnorm.BatchNorm)(4, "b")
    with pytest.raises(TypeError, match=r"`state` must be the equinox.nn.State .*make_with_state"):
        bn(jnp.ones((4, 3)), None)


def test_rms_norm_wrong_rank_names_the_fix():
    with pytest.raises(ValueError, match=r"rank 2 .* got x of rank 1 .* Construct the layer"):
        eqxnorm.RMSNorm((4, 8))(jnp.ones(8))
