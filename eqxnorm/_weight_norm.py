from typing import Generic, TypeVar

import equinox as eqx
import jax.numpy as jnp
from equinox.nn import State
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from . import _checking, functional
from ._dispatch import Impl, check_impl
from ._misc import sentinel
from ._weight_standardization import call_with_weight, wrapped_weight
from .kernels.reference import compute_dtype

_Layer = TypeVar("_Layer")


class WeightNorm(eqx.Module, Generic[_Layer]):
    r"""Weight normalization of a wrapped layer: the layer's weight $v$ is the direction and a
    learned $g$ the magnitude; every call rebuilds the weight

    $$W = g \, \frac{v}{\lVert v \rVert}$$

    and calls the layer with it. $\lVert v \rVert$ is one Euclidean norm per index of `axis`
    over every other axis: for [`equinox.nn.Linear`][] (`(out, in)`) and `axis=0`, one per
    output unit; for a convolution (`(out, in, *kernel)`), one per output channel. $g$ starts
    at $\lVert v \rVert$, so the wrapped layer computes what it did unwrapped. Gradients flow
    to both $v$ and $g$. Computed by [`eqxnorm.functional.weight_normalize`][] in float32
    (float64 for float64), the weight keeping its dtype.

    A drop-in replacement for `equinox.nn.WeightNorm`: the same arguments, fields (`layer`,
    `g`, `weight_name`, `axis`), initial $g$, call and outputs, plus a static `impl` and the
    optional `state` pass-through of the other wrappers. PyTorch's
    `torch.nn.utils.parametrizations.weight_norm` state dicts load with
    [`eqxnorm.load_torch_state_dict`][] (`original0` is $g$, `original1` is $v$).

    ??? cite
        [Weight Normalization: A Simple Reparameterization to Accelerate Training of Deep
        Neural Networks](https://arxiv.org/abs/1602.07868)

        ```bibtex
        @inproceedings{salimans2016weight,
            title={Weight Normalization: A Simple Reparameterization to Accelerate Training
                   of Deep Neural Networks},
            author={Tim Salimans and Diederik P. Kingma},
            booktitle={Advances in Neural Information Processing Systems},
            year={2016}
        }
        ```

    !!! example

        ```python
        linear = eqxnorm.WeightNorm(eqx.nn.Linear(64, 32, key=key))
        y = linear(x)  # x: (64,)
        ```
    """

    layer: _Layer
    g: Array
    weight_name: str = eqx.field(static=True)
    axis: int | None = eqx.field(static=True)
    impl: Impl = eqx.field(static=True)

    def __init__(
        self,
        layer: _Layer,
        weight_name: str = "weight",
        axis: int | None = 0,
        *,
        impl: Impl = "auto",
    ):
        """**Arguments:**

        - `layer`: the layer to wrap, usually an [`equinox.nn.Linear`][] or a convolution
            (e.g. [`equinox.nn.Conv2d`][]); any layer with the attribute `weight_name`.
        - `weight_name`: the name of the layer's weight (an array with at least two axes).
        - `axis`: the norm is taken over every axis but this one (one $g$ per index of
            it); `None` takes it over every axis (one $g$).
        - `impl`: `"auto"` or `"reference"`; see `eqxnorm.functional.weight_normalize`.

        **Raises:**

        `ValueError` when the layer has no attribute `weight_name` (the message lists the
        array attributes it has), when that attribute is `None` or has fewer than two
        axes, for an `axis` out of range or an unknown `impl`; `TypeError` for a
        non-floating weight, a non-int `axis` or a `weight_name` that is not a str.
        """
        where = f"WeightNorm({type(layer).__name__}, weight_name={weight_name!r})"
        weight = wrapped_weight(layer, weight_name, where, min_fan_in=1)
        axes = functional._weight_norm_axes(weight.ndim, axis, where)
        check_impl(impl, where)
        self.layer = layer
        self.weight_name = weight_name
        self.axis = axis
        self.impl = impl
        v = weight.astype(compute_dtype(weight.dtype))
        self.g = jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True)).astype(weight.dtype)

    @_checking.typechecked()
    def normalized_weight(self) -> Float[Array, "..."]:
        """The weight the wrapped layer is called with, $g\\,v/\\lVert v\\rVert$, of the raw
        weight's shape and dtype."""
        v = getattr(self.layer, self.weight_name)
        return functional.weight_normalize(v, self.g, axis=self.axis, impl=self.impl)

    @_checking.named_scope("eqxnorm.WeightNorm")
    @_checking.typechecked()
    def __call__(
        self,
        x: PyTree,
        state: State = sentinel,
        *,
        key: PRNGKeyArray | None = None,
    ) -> PyTree:
        """**Arguments:**

        As [`eqxnorm.WeightStandardization`][]'s call: `x` the wrapped layer's input, `state`
        passed through unchanged, `key` passed to the wrapped layer.

        **Returns:**

        The wrapped layer's output with the normalized weight; or `(output, state)` when
        `state` is passed.
        """
        weight = self.normalized_weight()
        return call_with_weight(self.layer, self.weight_name, weight, x, state, key)
