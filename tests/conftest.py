"""Test-wide JAX settings: fail on silent broadcasting and dtype promotion, and expose 8 host
CPU devices for the cross-device tests (set before any backend is created)."""

import jax
from hypothesis import settings

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Every example is a fresh trace and compile: no deadline, few examples, so the suite stays
# within CI's budget on 2 cores.
settings.register_profile("eqxnorm", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("eqxnorm")
