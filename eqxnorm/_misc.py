"""Small shared pieces of the module layer."""

import jax.numpy as jnp


class _Sentinel:
    def __repr__(self) -> str:
        return "sentinel"


# Default of the optional `state` argument: a layer called without a state returns only its
# output, as in `eqx.nn`.
sentinel = _Sentinel()


def default_floating_dtype():
    """float64 in JAX's 64-bit mode, else float32: the default dtype of `eqx.nn` parameters."""
    return jnp.zeros(()).dtype


def example_axis_names(shape: tuple[int, ...]) -> list[str]:
    """The names shape errors give the axes of one example of `shape`."""
    return ["dim"] if len(shape) == 1 else [f"shape[{i}]" for i in range(len(shape))]
