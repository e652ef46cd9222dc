import dataclasses
from typing import Any, Generic, TypeVar

import equinox as eqx
from equinox.nn import State
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from . import _checking, functional
from ._dispatch import Impl, check_impl
from ._misc import sentinel

_Layer = TypeVar("_Layer")


def _array_attributes(layer: Any) -> list[str]:
    """The names of `layer`'s attributes that hold arrays, for error messages."""
    if dataclasses.is_dataclass(layer):
        names = [field.name for field in dataclasses.fields(layer)]
    else:
        names = list(getattr(layer, "__dict__", {}))
    return [name for name in names if eqx.is_array(getattr(layer, name, None))]


def wrapped_weight(layer: Any, weight_name: Any, where: str, min_fan_in: int) -> Array:
    """The weight `layer.<weight_name>` a reparametrizing wrapper acts on, validated: it must
    exist, be a floating array, and have at least two axes and `min_fan_in` elements per
    output unit."""
    if not isinstance(weight_name, str):
        raise TypeError(
            f"{where}: `weight_name` must be the name (a str) of the wrapped layer's weight "
            f"attribute, but got {weight_name!r} of type {type(weight_name).__name__}. Pass "
            f"e.g. `weight_name='weight'`."
        )
    layer_type = type(layer).__name__
    if not hasattr(layer, weight_name):
        arrays = _array_attributes(layer)
        has = f"its array attributes are {arrays}" if arrays else "it has no array attributes"
        raise ValueError(
            f"{where}: the wrapped {layer_type} has no attribute {weight_name!r}; {has}. Pass "
            f"`weight_name=` the name of the weight to reparametrize."
        )
    weight = getattr(layer, weight_name)
    if weight is None:
        raise ValueError(
            f"{where}: the wrapped {layer_type}.{weight_name} is None (e.g. a parameter "
            f"disabled with use_bias=False or use_weight=False), so there is no weight to "
            f"reparametrize. Pass `weight_name=` an attribute that holds an array."
        )
    functional._check_weight_matrix(weight, where, min_fan_in)
    return weight


def call_with_weight(layer: Any, weight_name: str, weight: Array, x: Any, state: Any, key: Any):
    """`layer(x, key=key)` with `layer.<weight_name>` replaced by `weight`: the call of a
    reparametrizing wrapper, `(output, state)` when a `state` is passed through."""
    layer = eqx.tree_at(lambda m: getattr(m, weight_name), layer, weight)
    out = layer(x, key=key)  # pyright: ignore
    return out if state is sentinel else (out, state)


class WeightStandardization(eqx.Module, Generic[_Layer]):
    r"""Weight standardization of a wrapped layer: every call standardizes the layer's weight
    per output unit, then calls the layer with it.

    $$\hat W_{o} = \frac{W_{o} - \mathbb{E}[W_{o}]}{\sqrt{\mathrm{Var}[W_{o}] + \varepsilon}}$$

    with the mean and biased variance of output unit $o$'s weights over all the other axes
    (`in` for [`equinox.nn.Linear`][], `in × kernel` for a convolution). The raw weight $W$
    stays the parameter; gradients flow through the standardization to it. Paired with
    [`equinox.nn.GroupNorm`][] (or `eqxnorm.GroupNorm`) after each convolution, this is the
    normalization of BiT/NFNet-style ResNets trained with small per-device batches. The
    statistics are computed in float32 and the weight keeps its dtype. Computed by
    [`eqxnorm.functional.weight_standardize`][].

    ??? cite
        [Micro-Batch Training with Batch-Channel Normalization and Weight
        Standardization](https://arxiv.org/abs/1903.10520)

        ```bibtex
        @article{qiao2019micro,
            title={Micro-Batch Training with Batch-Channel Normalization and Weight
                   Standardization},
            author={Siyuan Qiao and Huiyu Wang and Chenxi Liu and Wei Shen and Alan Yuille},
            year={2019},
            journal={arXiv:1903.10520}
        }
        ```

    !!! example

        ```python
        conv = eqxnorm.WeightStandardization(eqx.nn.Conv2d(64, 64, 3, padding=1, key=key))
        norm = eqx.nn.GroupNorm(groups=32, channels=64)
        y = jax.nn.relu(norm(conv(x)))
        ```
    """

    layer: _Layer
    weight_name: str = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    impl: Impl = eqx.field(static=True)

    def __init__(
        self,
        layer: _Layer,
        weight_name: str = "weight",
        eps: _checking.Number = 1e-5,
        *,
        impl: Impl = "auto",
    ):
        """**Arguments:**

        - `layer`: the layer to wrap, usually an [`equinox.nn.Linear`][] or a convolution
            (e.g. [`equinox.nn.Conv2d`][]); any layer with the attribute `weight_name`.
        - `weight_name`: the name of the layer's weight, an array of shape `(out, *rest)`
            with at least two elements per output unit.
        - `eps`: added to the variance; must be positive.
        - `impl`: `"auto"`, `"pallas"` or `"reference"`; see `eqxnorm.functional`.

        **Raises:**

        `ValueError` when the layer has no attribute `weight_name` (the message lists the
        array attributes it has), when that attribute is `None` or has fewer than two axes
        or fewer than two elements per output unit, for `eps <= 0` or an unknown `impl`;
        `TypeError` for a non-floating weight or a `weight_name` that is not a str.
        """
        where = f"WeightStandardization({type(layer).__name__}, weight_name={weight_name!r})"
        wrapped_weight(layer, weight_name, where, min_fan_in=2)
        _checking.check_eps(eps, where)
        check_impl(impl, where)
        self.layer = layer
        self.weight_name = weight_name
        self.eps = float(eps)
        self.impl = impl

    @_checking.typechecked()
    def standardized_weight(self) -> Float[Array, "..."]:
        """The weight the wrapped layer is called with: `layer.<weight_name>` standardized,
        of the raw weight's shape and dtype."""
        weight = getattr(self.layer, self.weight_name)
        return functional.weight_standardize(weight, eps=self.eps, impl=self.impl)

    @_checking.named_scope("eqxnorm.WeightStandardization")
    @_checking.typechecked()
    def __call__(
        self,
        x: PyTree,
        state: State = sentinel,
        *,
        key: PRNGKeyArray | None = None,
    ) -> PyTree:
        """**Arguments:**

        - `x`: the wrapped layer's input (e.g. `(in,)` for a linear layer, `(in, *spatial)`
            for a convolution).
        - `state`: optional; passed through unchanged, so the layer can sit among stateful
            ones.
        - `key`: passed through to the wrapped layer.

        **Returns:**

        The wrapped layer's output with the standardized weight; or `(output, state)` when
        `state` is passed.
        """
        weight = self.standardized_weight()
        return call_with_weight(self.layer, self.weight_name, weight, x, state, key)
