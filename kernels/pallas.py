"""The Pallas implementation (`impl="pallas"`): the fused kernels of every normalization
family behind the same functions, with the same signatures, as `eqxnorm.kernels.reference`.

On GPU they lower through Mosaic GPU (on Hopper and newer with JAX 0.12+, where the operands
allow) or Triton, on TPU through Mosaic, and elsewhere (CPU) Pallas interprets them; see
`eqxnorm.kernels._common` for the targets, the block heuristic and the choice of GPU backend.
`backend` gives the same functions pinned to one GPU backend (`impl="triton"`,
`impl="mosaic_gpu"`).

These run the reference instead:

- float64 (with `jax_enable_x64`), which is promised float64 statistics while the kernels
  accumulate in float32 (TPUs have no float64, and a float64 Triton kernel would be no
  faster than XLA);
- empty arrays (a batch of 0 examples), where there is nothing to launch a kernel for (a
  `vmap` of 0 examples never reaches a launch either: every kernel's batching rule returns
  its empty outputs, `_sharding.empty_batch`);
- LayerNorm and RMSNorm with an `axis_name` (features split across devices): their
  statistics need a collective between the reduction and the normalization, which XLA fuses
  around in the reference (one fused reduction, the `pmean`, one fused normalization).
- a padding `mask` (statistics over some elements only): the kernels do not take one yet;
  the reference's masked statistics are one fused reduction and one fused normalization,
  with the mask (or the iota compare of `lengths=`) fused into both.
"""

import functools
import inspect
import types
from collections.abc import Callable

import jax.numpy as jnp

from . import batch_norm as _batch_norm, group_norm as _group_norm, reference, row_norm


def _kernel_or_reference(kernel: Callable, backend: str = "auto") -> Callable:
    reference_fn = getattr(reference, kernel.__name__)
    kernel = functools.wraps(kernel)(functools.partial(kernel, backend=backend))
    # A kernel without `axis_name` (the row norms) leaves statistics pooled over a named axis
    # to the reference; the dispatcher keeps the reference's signature either way.
    pools = "axis_name" in inspect.signature(kernel).parameters

    @functools.wraps(kernel)
    def dispatch(x, *args, **kwargs):
        use_reference = jnp.dtype(x.dtype) == jnp.float64 or x.size == 0
        # No kernel takes a padding mask yet: masked statistics run the reference.
        use_reference |= kwargs.get("mask") is not None
        if not use_reference:
            kwargs.pop("mask", None)
        if not pools:
            use_reference |= kwargs.get("axis_name") is not None
            if not use_reference:
                kwargs.pop("axis_name", None)
        return (reference_fn if use_reference else kernel)(x, *args, **kwargs)

    dispatch.__signature__ = inspect.signature(reference_fn)
    return dispatch


_FUNCTIONS = {
    "layer_norm": row_norm.layer_norm,
    "rms_norm": row_norm.rms_norm,
    "add_layer_norm": row_norm.add_layer_norm,
    "add_rms_norm": row_norm.add_rms_norm,
    "adaptive_layer_norm": row_norm.adaptive_layer_norm,
    "adaptive_rms_norm": row_norm.adaptive_rms_norm,
    "group_norm": _group_norm.group_norm,
    "adaptive_group_norm": _group_norm.adaptive_group_norm,
    "batch_norm": _batch_norm.batch_norm,
    "batch_norm_inference": _batch_norm.batch_norm_inference,
}


@functools.cache
def backend(name: str) -> types.ModuleType:
    """The functions of this module pinned to the GPU backend `name` (`"triton"` or
    `"mosaic_gpu"`), as a module: what `impl="triton"` and `impl="mosaic_gpu"` run. On CPU
    the pinned Mosaic GPU kernels run in Mosaic GPU's interpreter; operands they cannot run
    raise `ValueError`."""
    module = types.ModuleType(f"eqxnorm.kernels.pallas[{name}]", backend.__doc__)
    for fn_name, kernel in _FUNCTIONS.items():
        setattr(module, fn_name, _kernel_or_reference(kernel, name))
    module.__all__ = list(_FUNCTIONS)
    return module


layer_norm = _kernel_or_reference(row_norm.layer_norm)
rms_norm = _kernel_or_reference(row_norm.rms_norm)
add_layer_norm = _kernel_or_reference(row_norm.add_layer_norm)
add_rms_norm = _kernel_or_reference(row_norm.add_rms_norm)
adaptive_layer_norm = _kernel_or_reference(row_norm.adaptive_layer_norm)
adaptive_rms_norm = _kernel_or_reference(row_norm.adaptive_rms_norm)
group_norm = _kernel_or_reference(_group_norm.group_norm)
adaptive_group_norm = _kernel_or_reference(_group_norm.adaptive_group_norm)
batch_norm = _kernel_or_reference(_batch_norm.batch_norm)
batch_norm_inference = _kernel_or_reference(_batch_norm.batch_norm_inference)

__all__ = [
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "adaptive_layer_norm",
    "adaptive_rms_norm",
    "group_norm",
    "adaptive_group_norm",
    "batch_norm",
    "batch_norm_inference",
]
