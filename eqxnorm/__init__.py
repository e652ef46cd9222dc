"""eqxnorm: normalization layers for JAX/Equinox, shape-checked, with fused Pallas kernels."""

from . import functional as functional, kernels as kernels
from ._adaptive_norm import (
    AdaptiveGroupNorm as AdaptiveGroupNorm,
    AdaptiveLayerNorm as AdaptiveLayerNorm,
    AdaptiveRMSNorm as AdaptiveRMSNorm,
)
from ._batch_norm import BatchNorm as BatchNorm
from ._group_norm import GroupNorm as GroupNorm
from ._instance_norm import InstanceNorm as InstanceNorm
from ._layer_norm import LayerNorm as LayerNorm
from ._rms_norm import RMSNorm as RMSNorm
from ._spectral_norm import SpectralNorm as SpectralNorm
from ._torch_interop import (
    load_torch_state_dict as load_torch_state_dict,
    torch_state_dict as torch_state_dict,
)
from ._weight_norm import WeightNorm as WeightNorm
from ._weight_standardization import WeightStandardization as WeightStandardization
from .kernels._triton import TritonBackendWarning as TritonBackendWarning

__version__ = "0.1.0.dev0"
