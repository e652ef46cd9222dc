"""What the examples share: Adam (Kingma & Ba, 2015) written by hand, so they need no
optimizer library (a few `jax.tree.map`s over a model's inexact arrays), and the moving
average their loss plots use."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree


class Adam(eqx.Module):
    """Adam (Kingma & Ba, 2015) on the inexact arrays of a model, in a few `jax.tree.map`s."""

    step: Float[Array, ""]
    mean: PyTree
    square: PyTree

    @staticmethod
    def init(model: eqx.Module) -> "Adam":
        zeros = jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))
        return Adam(jnp.zeros((), jnp.float32), zeros, zeros)

    def apply(self, model, grads, learning_rate, b1=0.9, b2=0.999, eps=1e-8):
        step = self.step + 1
        mean = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, self.mean, grads)
        square = jax.tree.map(lambda s, g: b2 * s + (1 - b2) * g * g, self.square, grads)
        rate = learning_rate * jnp.sqrt(1 - b2**step) / (1 - b1**step)
        updates = jax.tree.map(lambda m, s: -rate * m / (jnp.sqrt(s) + eps), mean, square)
        return eqx.apply_updates(model, updates), Adam(step, mean, square)


def smooth(values: list[float], window: int) -> np.ndarray:
    """A trailing moving average (shorter at the start), to read minibatch loss curves."""
    cumulative = np.cumsum(np.insert(np.asarray(values), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)
