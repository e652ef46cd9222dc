from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox.nn import State
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from . import _checking, functional
from ._checking import AnyArray
from ._dispatch import Impl, check_impl
from ._layer_norm import LayerNorm
from ._misc import example_axis_names, sentinel


class DyT(eqx.Module):
    r"""Dynamic Tanh, the drop-in replacement for LayerNorm of "Transformers without
    Normalization":

    $$y = \gamma \tanh(\alpha x) + \beta$$

    elementwise, with a learnable scalar $\alpha$ (initialised to `alpha_init`) and $\gamma$,
    $\beta$ of shape `shape` (initialised to ones and zeros). No statistics: it replaces the
    norm, not its cost of a reduction. The twin of Liger's `LigerDyT` and of the paper's
    `DynamicTanh` (parameters `alpha`, `weight`, `bias`). Called like
    [`eqxnorm.LayerNorm`][] (one example, an optional `state` passed through), so
    [`eqxnorm.convert_layer_norms_to_dyt`][] can swap it in.

    ??? cite
        [Transformers without Normalization](https://arxiv.org/abs/2503.10622)

        ```bibtex
        @inproceedings{zhu2025transformers,
            title={Transformers without Normalization},
            author={Jiachen Zhu and Xinlei Chen and Kaiming He and Yann LeCun and Zhuang Liu},
            booktitle={CVPR},
            year={2025}
        }
        ```
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    impl: Impl = eqx.field(static=True)
    alpha: Float[Array, ""]
    weight: Float[Array, "*shape"] | None
    bias: Float[Array, "*shape"] | None

    def __init__(
        self,
        shape: int | Sequence[int],
        alpha_init: _checking.Number = 0.5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype=None,
        *,
        impl: Impl = "auto",
    ):
        """**Arguments:**

        - `shape`: the shape of one example (an int for a vector).
        - `alpha_init`: the initial $\\alpha$ (the paper's 0.5; it suggests smaller for
            wide or deep LLMs).
        - `use_weight`: whether to learn the scale $\\gamma$ (initialised to ones).
        - `use_bias`: whether to learn the shift $\\beta$ (initialised to zeros).
        - `dtype`: dtype of the parameters; defaults to float32 (float64 in 64-bit mode).
        - `impl`: `"auto"`, `"pallas"`, `"triton"`, `"mosaic_gpu"` or `"reference"`; see
            `eqxnorm.functional`.

        **Raises:**

        `ValueError` for an empty `shape` or an unknown `impl`; `TypeError` for a
        non-numeric `alpha_init`.
        """
        where = "DyT"
        self.shape = _checking.normalize_shape(shape, where)
        if isinstance(alpha_init, bool) or not isinstance(alpha_init, (int, float)):
            raise TypeError(
                f"{where}: alpha_init must be a number, but got {alpha_init!r} of type "
                f"{type(alpha_init).__name__}."
            )
        check_impl(impl, where)
        self.use_weight, self.use_bias, self.impl = use_weight, use_bias, impl
        self.alpha = jnp.asarray(alpha_init, dtype=dtype)
        self.weight = jnp.ones(self.shape, dtype=dtype) if use_weight else None
        self.bias = jnp.zeros(self.shape, dtype=dtype) if use_bias else None

    def _precheck(self, x, state=sentinel, *, key=None):
        where = f"DyT(shape={self.shape})"
        _checking.check_floating(x, "x", where)
        names = example_axis_names(self.shape)
        _checking.check_example_shape(x, self.shape, where, names)

    @_checking.typechecked(_precheck)
    def __call__(
        self,
        x: Float[AnyArray, "*shape"],
        state: State = sentinel,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*shape"] | tuple[Float[Array, "*shape"], State]:
        """**Arguments:**

        - `x`: one example, of shape `shape`; floating point.
        - `state`: optional; passed through unchanged, as by [`eqxnorm.LayerNorm`][].
        - `key`: ignored; for compatibility with the rest of the Equinox API.

        **Returns:**

        An array of `x`'s shape and dtype; or `(output, state)` when `state` is passed.

        **Raises:**

        `ValueError` when `x.shape != shape`; `TypeError` for non-floating input.
        """
        with jax.named_scope("eqxnorm.DyT"):
            out = functional.dyt(
                x, self.alpha, self.weight, self.bias, shape=self.shape, impl=self.impl
            )
        return out if state is sentinel else (out, state)


def _dyt_like(norm: Any, alpha_init: float, impl: Impl | None) -> DyT:
    """A fresh [`DyT`][] of `norm`'s shape, parameters and dtype."""
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    return DyT(
        norm.shape,
        alpha_init,
        use_weight=norm.weight is not None,
        use_bias=norm.bias is not None,
        dtype=params[0].dtype if params else None,
        impl=getattr(norm, "impl", "auto") if impl is None else impl,
    )


def convert_layer_norms_to_dyt(
    model: PyTree,
    alpha_init: _checking.Number = 0.5,
    *,
    types: tuple[type, ...] = (LayerNorm, eqx.nn.LayerNorm),
    impl: Impl | None = None,
) -> PyTree:
    """`model` with every LayerNorm swapped for a fresh [`eqxnorm.DyT`][] of its shape
    (with a weight and bias where it had them, in their dtype), by `eqx.tree_at`: the paper's
    recipe for training a transformer without normalization.

    **Arguments:**

    - `model`: any PyTree of Equinox modules.
    - `alpha_init`: every DyT's initial $\\alpha$.
    - `types`: the layer types replaced: `eqxnorm.LayerNorm` and `equinox.nn.LayerNorm` (add
        `eqxnorm.RMSNorm`/`equinox.nn.RMSNorm` to replace those too; each needs `shape`,
        `weight` and `bias` attributes).
    - `impl`: the DyTs' `impl`; by default each takes its LayerNorm's (`"auto"` for
        Equinox's).

    **Returns:**

    `model` with the replacements (the same object when it holds no such layer).

    **Raises:**

    `ValueError` for an unknown `impl`.
    """
    if impl is not None:
        check_impl(impl, "convert_layer_norms_to_dyt")

    def is_norm(node):
        return isinstance(node, types)

    def norms(tree):
        return [n for n in jax.tree.leaves(tree, is_leaf=is_norm) if is_norm(n)]

    found = norms(model)
    if not found:
        return model
    return eqx.tree_at(norms, model, [_dyt_like(n, alpha_init, impl) for n in found])
