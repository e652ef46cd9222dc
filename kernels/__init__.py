"""Implementations behind `eqxnorm.functional`: the `jax.numpy` reference (the oracle and the
CPU path) and, per normalization family, the fused Pallas kernels."""

from . import reference as reference
