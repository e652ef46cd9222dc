"""Test-wide JAX settings: fail on silent broadcasting and dtype promotion, and expose 8 host
CPU devices for the cross-device tests (set before any backend is created). The tests run on
the CPU even where a GPU (or the CUDA plugin of the `gpu-check` extra) is installed: the
kernels run in Pallas' interpret mode, and GPU lowering is checked by export and by the
deviceless compile (set JAX_PLATFORMS to run them natively on a GPU, as the GPU runbook does)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The kernels' launches are the heuristic's, whatever a tuning cache on this machine says.
os.environ["EQXNORM_TUNING_CACHE"] = "off"

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Every example is a fresh trace and compile: no deadline, few examples, so the suite stays
# within CI's budget on 2 cores.
settings.register_profile("eqxnorm", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("eqxnorm")


@pytest.fixture
def mosaic_gpu_auto():
    """`impl="auto"` taking the row norms' Mosaic GPU kernels where they run, which by default
    it does not (`row_norm.taking_mosaic_gpu`)."""
    from eqxnorm.kernels import row_norm

    with row_norm.taking_mosaic_gpu():
        yield
