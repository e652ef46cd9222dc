"""The Pallas implementation (`impl="pallas"`): the fused kernels of every normalization
family behind the same functions, with the same signatures, as `eqxnorm.kernels.reference`.

On GPU they lower through Triton, on TPU through Mosaic, and elsewhere (CPU) Pallas
interprets them; see `eqxnorm.kernels._common` for the targets and the block heuristic.

The kernels accumulate in float32, which is what float32, bfloat16 and float16 inputs are
promised; float64 input (with `jax_enable_x64`) is promised float64 statistics, so it runs
the reference instead (TPUs have no float64, and a float64 Triton kernel would be no faster
than XLA).
"""

import functools
from collections.abc import Callable

import jax.numpy as jnp

from . import batch_norm as _batch_norm, group_norm as _group_norm, reference, row_norm


def _float64_to_reference(kernel: Callable) -> Callable:
    reference_fn = getattr(reference, kernel.__name__)

    @functools.wraps(kernel)
    def dispatch(x, *args, **kwargs):
        fn = reference_fn if jnp.dtype(x.dtype) == jnp.float64 else kernel
        return fn(x, *args, **kwargs)

    return dispatch


layer_norm = _float64_to_reference(row_norm.layer_norm)
rms_norm = _float64_to_reference(row_norm.rms_norm)
group_norm = _float64_to_reference(_group_norm.group_norm)
batch_norm = _float64_to_reference(_batch_norm.batch_norm)
batch_norm_inference = _float64_to_reference(_batch_norm.batch_norm_inference)

__all__ = ["layer_norm", "rms_norm", "group_norm", "batch_norm", "batch_norm_inference"]
