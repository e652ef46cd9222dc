from typing import ClassVar

from ._layer_norm import _RowNorm


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
