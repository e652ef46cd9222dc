from collections.abc import Sequence
from typing import ClassVar

from equinox.nn import State
from jaxtyping import Array, Float, PRNGKeyArray

from . import _checking
from ._checking import AnyArray
from ._dispatch import Impl
from ._layer_norm import _RowNorm
from ._misc import sentinel


class RMSNorm(_RowNorm):
    r"""Root-mean-square normalization over the whole example: rescales without centering.

    $$y = \frac{x}{\sqrt{\frac{1}{n}\sum_{i=1}^n x_i^2 + \varepsilon}} \gamma + \beta$$

    with $n$ the number of elements of `x` (of shape `shape`), and $\gamma$, $\beta$ of shape
    `shape` (or $1$, $0$ when disabled). A drop-in replacement for `equinox.nn.RMSNorm`: same
    arguments and defaults (including `use_bias=True`, Equinox's default; pass
    `use_bias=False` for the bias-free RMSNorm of most transformers), parameter names and call;
    plus a static `impl`. The mean square is computed in float32 and the output keeps `x`'s
    dtype.

    ??? cite
        [Root Mean Square Layer Normalization](https://arxiv.org/abs/1910.07467)

        ```bibtex
        @article{zhang2019root,
            title={Root Mean Square Layer Normalization},
            author={Biao Zhang and Rico Sennrich},
            year={2019},
            journal={arXiv:1910.07467}
        }
        ```
    """

    _function: ClassVar[str] = "rms_norm"

    def __init__(
        self,
        shape: int | Sequence[int],
        eps: float = 1e-5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype=None,
        *,
        impl: Impl = "auto",
    ):
        """**Arguments:**

        - `shape`: the shape of one example (an int for a vector).
        - `eps`: added to the mean square; must be positive.
        - `use_weight`: whether to learn the scale $\\gamma$ (initialised to ones).
        - `use_bias`: whether to learn the shift $\\beta$ (initialised to zeros).
        - `dtype`: dtype of the parameters; defaults to float32 (float64 in 64-bit mode).
        - `impl`: `"auto"`, `"pallas"` or `"reference"`; see `eqxnorm.functional`.

        **Raises:**

        `ValueError` for an empty `shape`, `eps <= 0` or an unknown `impl`.
        """
        super().__init__(shape, eps, use_weight, use_bias, dtype, impl=impl)

    @_checking.named_scope("eqxnorm.RMSNorm")
    @_checking.typechecked(_RowNorm._precheck)
    def __call__(
        self,
        x: Float[AnyArray, "*shape"],
        state: State = sentinel,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*shape"] | tuple[Float[Array, "*shape"], State]:
        """**Arguments:**

        - `x`: one example, of shape `shape`; floating point.
        - `state`: optional; passed through unchanged, for interchangeability with
            `BatchNorm`.
        - `key`: ignored; for compatibility with the rest of the Equinox API.

        **Returns:**

        The normalized array, of `x`'s shape and dtype; or `(output, state)` when `state` is
        passed.

        **Raises:**

        `ValueError` when `x.shape != shape` (a left-in batch axis is named, with the
        `jax.vmap` fix); `TypeError` for non-floating input.
        """
        return self._apply(x, state)
