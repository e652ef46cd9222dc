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
