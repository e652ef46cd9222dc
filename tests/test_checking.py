"""`eqxnorm._checking`: friendly prechecks run first, jaxtyping+beartype is the backstop."""

import jax.numpy as jnp
import pytest
from jaxtyping import Array, Float, TypeCheckError

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
    with pytest.raises(TypeError, match="Python float"):
        _checking.check_eps(True, "L")
    with pytest.raises(TypeError, match="Python float"):
        _checking.check_eps(jnp.asarray(1e-5), "L")
