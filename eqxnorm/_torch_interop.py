r"""PyTorch interoperability: load the state dict of a `torch.nn` norm layer into an eqxnorm
layer (and its [`equinox.nn.State`][]), and export an eqxnorm layer as one.

The state dicts are plain mappings from PyTorch's key names to arrays: NumPy arrays, or
anything `np.asarray` accepts (PyTorch tensors included, converted with
`.detach().cpu().numpy()`). PyTorch itself is never imported.

| eqxnorm                          | `torch.nn`                         | keys                 |
|----------------------------------|------------------------------------|----------------------|
| `LayerNorm(shape)`               | `LayerNorm(shape)`                 | `weight`, `bias`     |
| `LayerNorm(shape, use_bias=False)` | `LayerNorm(shape, bias=False)`   | `weight`             |
| `LayerNorm(shape, False, False)` | `LayerNorm(shape, elementwise_affine=False)` | none       |
| `RMSNorm(shape, use_bias=False)` | `RMSNorm(shape, eps=1e-5)`         | `weight` (never a bias) |
| `RMSNorm(dim, 1e-6, use_bias=False, weight_offset=1.0)` | HF `GemmaRMSNorm(dim)` | `weight` |
| `GroupNorm(groups, channels)`    | `GroupNorm(groups, channels)`      | `weight`, `bias`     |
| `InstanceNorm(C, channelwise_affine=True)` | `InstanceNorm2d(C, affine=True)` | `weight`, `bias` |
| `GatedRMSNorm(dim)`              | `Qwen3NextRMSNormGated(dim)`       | `weight`             |
| `WeightNorm(layer, "weight", axis)` | `weight_norm(layer, "weight", dim=axis)` | see below |

`WeightNorm` of a `Linear` or `Conv*` maps to `torch.nn.utils.parametrizations.weight_norm`
of its twin: `bias` (if any) and `parametrizations.weight.original0` ($g$) and
`parametrizations.weight.original1` ($v$, the wrapped layer's weight), in PyTorch's shapes.
These are Equinox's but for PyTorch's scalar $g$ for `dim=None` (Equinox's `axis=None` keeps
one axis of size 1 per weight axis) and its `(out,)` convolution bias (Equinox's is
`(out, 1, ..., 1)`).

`BatchNorm(C, axis_name)` and its state map to `BatchNorm2d(C)`: `weight`, `bias`, and
`running_mean`, `running_var`, `num_batches_tracked` from and to the state. The 1d and 3d
PyTorch classes have the same keys; without the affine there is no `weight` and no `bias`.
`GatedRMSNorm`'s twins are Hugging Face's `Qwen3NextRMSNormGated` and `mamba_ssm`'s
`RMSNormGated` (give `norm_before_gate=False` for Mamba-2's), which have no bias.

A state dict holds no hyperparameters: construct the eqxnorm layer with the PyTorch layer's
shape, `eps` (PyTorch's `RMSNorm` defaults to `eps=None`, the input dtype's machine epsilon,
so give it explicitly on one side), groups and momentum.

**Zero-centred weights.** Gemma's RMSNorm (Hugging Face `GemmaRMSNorm`, and the
`Gemma2`/`Gemma3`/`Qwen3Next` ones built like it) stores `weight` around 0 and scales by
`1 + weight`: its twin is an `RMSNorm` with `weight_offset=1.0`, whose `weight` is the same
array. A state dict's weights are read (and written) as stored against the layer's own
`weight_offset`, unless `weight_offset=` names the convention of the state dict: loading a
Gemma checkpoint into a plain `RMSNorm` is `weight_offset=1.0` (the layer's weight becomes
`1 + weight`), and exporting a zero-centred layer for `torch.nn.RMSNorm` is
`weight_offset=0.0`.

**BatchNorm.** Both libraries normalize in inference with the stored running mean and
*unbiased* running variance, so the running statistics are copied unchanged in both
directions, and `num_batches_tracked` is the state's step `count`: after a load, eqxnorm's
inference output is PyTorch's eval output, and after an export, PyTorch's eval output is
eqxnorm's inference output. The momenta are each other's complement: PyTorch's `momentum`
is the weight of the new batch, eqxnorm's the weight kept, so PyTorch's `momentum=0.1` is
eqxnorm's `momentum=0.9`. PyTorch updates with that constant weight from initial values 0
and 1; eqxnorm's debiased average weighs step $t$'s batch by
$(1 - m)/(1 - m^t)$. Training continued in eqxnorm after a load therefore takes
$t$ = `num_batches_tracked + 1` and matches PyTorch's update to within a factor
$1/(1 - m^t)$ of its weight, which is 1 once $m^t$ is negligible ($t \gg 1/(1 - m)$);
earlier, eqxnorm gives the new batch more weight, as its statistics carry none of the
initial 0 and 1. (PyTorch's `momentum=None`, a cumulative average that weighs step $t$ by
$1/t$, reads an exported `num_batches_tracked` as eqxnorm does: the number of batches
the statistics average.)
"""

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from equinox.nn import State

from ._batch_norm import BatchNorm
from ._gated_rms_norm import GatedRMSNorm
from ._group_norm import GroupNorm
from ._instance_norm import InstanceNorm
from ._layer_norm import LayerNorm, _RowNorm
from ._rms_norm import RMSNorm
from ._weight_norm import WeightNorm

_TORCH_TWINS: dict[type, str] = {
    LayerNorm: "torch.nn.LayerNorm",
    RMSNorm: "torch.nn.RMSNorm",
    GroupNorm: "torch.nn.GroupNorm",
    InstanceNorm: "torch.nn.InstanceNorm1d/2d/3d",
    BatchNorm: "torch.nn.BatchNorm1d/2d/3d",
    GatedRMSNorm: "Qwen3NextRMSNormGated (Hugging Face) / RMSNormGated (mamba_ssm)",
    WeightNorm: "torch.nn.utils.parametrizations.weight_norm",
}
_SUPPORTED = (
    "eqxnorm.LayerNorm, eqxnorm.RMSNorm, eqxnorm.GroupNorm, eqxnorm.InstanceNorm, "
    "eqxnorm.BatchNorm, eqxnorm.GatedRMSNorm and eqxnorm.WeightNorm"
)
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")
_MAX_COUNT = int(np.iinfo(np.int32).max)
# NumPy dtypes PyTorch's `torch.tensor` accepts; others (ml_dtypes' bfloat16) export as float32.
_TORCH_READABLE = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _kind(layer: Any, where: str) -> type:
    for kind in _TORCH_TWINS:
        if isinstance(layer, kind):
            return kind
    raise TypeError(
        f"{where}: got a layer of type {type(layer).__module__}.{type(layer).__qualname__}, "
        f"which has no PyTorch mapping. The supported layers are {_SUPPORTED}; call it on "
        f"each norm layer of a model separately, with that layer's `prefix`."
    )


def _describe(layer: Any) -> str:
    if isinstance(layer, GatedRMSNorm):
        return (
            f"eqxnorm.GatedRMSNorm({layer.shape}, use_weight={layer.use_weight}, "
            f"norm_before_gate={layer.norm_before_gate})"
        )
    if isinstance(layer, WeightNorm):
        return (
            f"eqxnorm.WeightNorm({type(layer.layer).__name__}, weight_name="
            f"{layer.weight_name!r}, axis={layer.axis!r})"
        )
    if isinstance(layer, _RowNorm):
        shape = layer.shape[0] if len(layer.shape) == 1 else layer.shape
        offset = f", weight_offset={layer.weight_offset}" if layer.weight_offset else ""
        return (
            f"eqxnorm.{type(layer).__name__}({shape}, use_weight={layer.use_weight}, "
            f"use_bias={layer.use_bias}{offset})"
        )
    if isinstance(layer, GroupNorm):
        return (
            f"eqxnorm.GroupNorm(groups={layer.groups}, channels={layer.channels}, "
            f"channelwise_affine={layer.channelwise_affine})"
        )
    if isinstance(layer, InstanceNorm):
        return (
            f"eqxnorm.InstanceNorm({layer.channels}, channelwise_affine={layer.channelwise_affine})"
        )
    return (
        f"eqxnorm.BatchNorm({layer.input_size}, axis_name={layer.axis_name!r}, "
        f"channelwise_affine={layer.channelwise_affine})"
    )


def _dropped_bias(layer: Any) -> bool:
    """Whether `layer` has a bias that its PyTorch twin cannot hold: `torch.nn.RMSNorm` has
    none, and `torch.nn.LayerNorm` has none without a weight."""
    if not isinstance(layer, _RowNorm) or layer.bias is None:
        return False
    return isinstance(layer, RMSNorm) or layer.weight is None


def _weight_norm_slots(layer: WeightNorm) -> dict[str, Any]:
    """The arrays of a `WeightNorm` that PyTorch's twin holds, by PyTorch name, in PyTorch's
    order, as functions of the layer (for `eqx.tree_at`)."""
    wrapped = layer.layer
    slots = {}
    if eqx.is_array(getattr(wrapped, "bias", None)):
        slots["bias"] = lambda m: m.layer.bias
    group = f"parametrizations.{layer.weight_name}."
    slots[group + "original0"] = lambda m: m.g
    slots[group + "original1"] = lambda m: getattr(m.layer, m.weight_name)
    return slots


def _torch_shape(layer: Any, name: str, like: Any) -> tuple[int, ...]:
    """The shape PyTorch stores the value `like` of `name` in: `like`'s, but for a
    `WeightNorm`'s one-value `g` (`axis=None`: a scalar) and convolution bias (`(out,)`)."""
    if isinstance(layer, WeightNorm):
        if name == "bias":
            return (like.size,)
        if name.endswith(".original0") and layer.axis is None:
            return ()
    return tuple(like.shape)


def _params(layer: Any) -> dict[str, jax.Array]:
    """The parameters PyTorch's twin holds, by PyTorch name, in PyTorch's order."""
    if isinstance(layer, WeightNorm):
        return {name: get(layer) for name, get in _weight_norm_slots(layer).items()}
    params = {}
    if layer.weight is not None:
        params["weight"] = layer.weight
    # A gated RMSNorm, like its twins, has no bias.
    if getattr(layer, "bias", None) is not None and not _dropped_bias(layer):
        params["bias"] = layer.bias
    return params


def _offset_shift(layer: Any, weight_offset: Any, where: str) -> float:
    """What the layer's stored weight exceeds a state dict's by: the state dict's
    `weight_offset` (default: the layer's own) less the layer's."""
    own = getattr(layer, "weight_offset", 0.0)
    if weight_offset is None:
        return 0.0
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, (int, float)):
        raise TypeError(
            f"{where}: `weight_offset` must be a number (the offset the state dict's weight is "
            f"stored against: 1.0 for Gemma's RMSNorm, 0.0 for torch.nn), but got "
            f"{weight_offset!r}."
        )
    if not isinstance(layer, _RowNorm) and weight_offset != 0:
        raise ValueError(
            f"{where}: weight_offset={weight_offset!r} applies to LayerNorm and RMSNorm "
            f"weights, but got {_describe(layer)}. Drop `weight_offset`."
        )
    return float(weight_offset) - own


def _running(layer: BatchNorm, state: Any, where: str) -> tuple[Any, Any, Any]:
    """`(mean, var, count)` of a BatchNorm from `state`, with the errors for a missing or
    foreign state."""
    if state is None:
        raise ValueError(
            f"{where}: {_describe(layer)} keeps its running statistics in an "
            f"`eqx.nn.State`, so `state` is needed, but got state=None. Pass the state made "
            f"with the layer, e.g. `bn, state = eqx.nn.make_with_state(eqxnorm.BatchNorm)"
            f"(...)`, as `state=state`."
        )
    if not isinstance(state, State):
        raise TypeError(
            f"{where}: `state` must be an `eqx.nn.State`, but got an object of type "
            f"{type(state).__name__}. Pass the state from `eqx.nn.make_with_state`."
        )
    try:
        mean, var = state.get(layer.running_index)
        count = state.get(layer.count_index)
    except KeyError:
        raise ValueError(
            f"{where}: the given `state` does not hold the running statistics of "
            f"{_describe(layer)}. Pass the state made together with this layer (or with the "
            f"model that contains it) by `eqx.nn.make_with_state`."
        ) from None
    if mean.shape != (layer.input_size,):
        raise ValueError(
            f"{where}: the given `state` holds running statistics of shape {mean.shape} where "
            f"{_describe(layer)} has ({layer.input_size},): it belongs to another layer at "
            f"the same place in another model. Pass the state made together with this layer."
        )
    return mean, var, count


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}]" if keys else "none"


def _prefix_candidates(names: list[str], keys: list[str], prefix: str) -> list[str]:
    """Prefixes under which `keys` hold one of the expected `names`, other than `prefix`."""
    found = set()
    for key in keys:
        for name in names:
            if key == name or key.endswith("." + name):
                found.add(key[: len(key) - len(name)])
    return sorted(found - {prefix})


def _missing_hint(layer: Any, missing: set[str], names: list[str], candidates: list[str]) -> str:
    if candidates:
        listed = " or ".join(f"`prefix={c!r}`" for c in candidates[:3])
        return f"The state dict holds these names under another prefix: pass {listed}."
    if isinstance(layer, BatchNorm) and missing & {"running_mean", "running_var"}:
        return (
            "A PyTorch BatchNorm with track_running_stats=False has no running statistics, "
            "and eqxnorm.BatchNorm always keeps them: load its parameters into a layer whose "
            "state you leave fresh, and call it with `inference=False` (batch statistics, "
            "which is what such a PyTorch layer uses in eval mode too)."
        )
    if isinstance(layer, WeightNorm) and missing - {"bias"}:
        return (
            "The legacy `torch.nn.utils.weight_norm` saves `weight_g` and `weight_v`: they are "
            "`original0` and `original1` of `torch.nn.utils.parametrizations.weight_norm`. "
            "Construct the eqxnorm layer with the PyTorch layer's `name` as `weight_name`."
        )
    if isinstance(layer, WeightNorm):
        return "The PyTorch layer has no bias: wrap a layer built with `use_bias=False`."
    if missing == {"num_batches_tracked"}:
        return (
            "State dicts saved before PyTorch 0.4.1 lack it: add it with the number of "
            "training steps taken, e.g. `np.asarray(1_000_000)` if it is unknown (a large "
            "count makes eqxnorm's next update weigh the new batch by 1 - momentum, as "
            "PyTorch does)."
        )
    affine = {"weight", "bias"} & set(names)
    if affine and affine <= missing:
        flag = {
            LayerNorm: "`use_weight=False, use_bias=False` (PyTorch's elementwise_affine=False)",
            RMSNorm: "`use_weight=False` (PyTorch's elementwise_affine=False)",
            GatedRMSNorm: "`use_weight=False`",
        }.get(type(layer), "`channelwise_affine=False` (PyTorch's affine=False)")
        return (
            f"If the PyTorch layer has no affine parameters, construct this layer without "
            f"them: {flag}."
        )
    if isinstance(layer, LayerNorm) and missing == {"bias"}:
        return (
            "PyTorch's LayerNorm(..., bias=False) has no bias: construct this layer with "
            "`use_bias=False`."
        )
    return "Construct the eqxnorm layer with the same settings as the PyTorch layer."


def _unexpected_hint(layer: Any, unexpected: set[str], prefix: str) -> str:
    hints = []
    if isinstance(layer, InstanceNorm) and unexpected & set(_RUNNING_STATS):
        hints.append(
            "The running statistics are those of a PyTorch InstanceNorm with "
            "track_running_stats=True, which normalizes with them in eval mode; "
            "eqxnorm.InstanceNorm always normalizes each input with its own statistics (as "
            "PyTorch does in train mode, and in eval mode without running statistics), so it "
            "cannot reproduce that eval output."
        )
    if isinstance(layer, RMSNorm) and "bias" in unexpected:
        hints.append(
            "torch.nn.RMSNorm has no bias, so `bias` does not come from one; "
            "load_torch_state_dict reads only its `weight` (and sets this layer's bias, if "
            "any, to zeros)."
        )
    if isinstance(layer, WeightNorm):
        hints.append(
            "The wrapped layer has no place for them: wrap a layer built like the PyTorch one "
            "(e.g. with a bias), with the PyTorch layer's `name` as `weight_name`."
        )
        unexpected = set()
    affine = unexpected & {"weight", "bias"}
    if isinstance(layer, RMSNorm):
        affine -= {"bias"}
    if affine:
        if isinstance(layer, _RowNorm):
            flag = " and ".join(f"`use_{n}=True`" for n in ("weight", "bias") if n in affine)
        else:
            flag = "`channelwise_affine=True`"
        hints.append(f"The PyTorch layer has affine parameters: construct this layer with {flag}.")
    dotted = sorted(k for k in unexpected if "." in k)
    if not hints and not prefix and dotted:
        example = dotted[0].rsplit(".", 1)[0] + "."
        hints.append(
            f"If this is a whole model's state dict, pass this layer's prefix, e.g. "
            f"`prefix={example!r}` (keys outside the prefix are ignored)."
        )
    return " ".join(hints) or "Check that the prefix names this layer's entries only."


def _check_keys(
    layer: Any,
    names: list[str],
    state_dict: Mapping[str, Any],
    prefix: str,
    strict: bool,
    where: str,
) -> None:
    keys = list(state_dict)
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(
                f"{where}: state dict keys must be strings, as in PyTorch's state_dict(), but "
                f"got the key {key!r} of type {type(key).__name__}."
            )
    under = [k for k in keys if k.startswith(prefix)]
    expected = [prefix + n for n in names]
    scope = f" under the prefix {prefix!r}" if prefix else ""
    missing = [k for k in expected if k not in state_dict]
    if missing:
        present = under if under else keys
        present_scope = scope if under else ""
        hint = _missing_hint(
            layer,
            {k[len(prefix) :] for k in missing},
            names,
            _prefix_candidates(names, keys, prefix),
        )
        raise ValueError(
            f"{where}: {_describe(layer)} loads the keys {_listing(expected)}, but the state "
            f"dict lacks {_listing(missing)}. Keys present{present_scope}: "
            f"{_listing(present)}. {hint}"
        )
    unexpected = [k for k in under if k not in expected]
    if unexpected and strict:
        hint = _unexpected_hint(layer, {k[len(prefix) :] for k in unexpected}, prefix)
        raise ValueError(
            f"{where}: the state dict has the unexpected key(s) {_listing(unexpected)}"
            f"{scope}, for which {_describe(layer)} has no place (it loads "
            f"{_listing(expected)}). {hint} Pass `strict=False` to ignore such keys."
        )


def _to_numpy(value: Any, key: str, where: str) -> np.ndarray:
    if all(hasattr(value, attr) for attr in ("detach", "cpu", "numpy")):
        # A PyTorch tensor, possibly requiring grad or on a GPU. NumPy has no bfloat16, and
        # float32 holds every bfloat16 exactly.
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{where}: the value of `{key}` could not be read as an array ({error}). Pass a "
            f"NumPy array or a PyTorch tensor."
        ) from None
    real = jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)
    if not real or array.dtype == np.bool_:
        raise TypeError(
            f"{where}: `{key}` must hold real numbers, but got an array of dtype "
            f"{array.dtype}. Pass the PyTorch tensor (or `tensor.numpy()`) as saved."
        )
    return array


def _shape_fix(layer: Any, name: str, got: tuple[int, ...]) -> str:
    if name == "num_batches_tracked":
        return "PyTorch stores it as a scalar: pass e.g. `np.asarray(n)`."
    if isinstance(layer, WeightNorm):
        return (
            "Wrap a layer of the PyTorch layer's sizes, with `axis=` the PyTorch layer's "
            "`dim` (`axis=None` for `dim=None`)."
        )
    if isinstance(layer, (_RowNorm, GatedRMSNorm)):
        if not got:
            return "Pass the PyTorch layer's tensor as saved."
        shape = got[0] if len(got) == 1 else got
        return (
            f"Construct the layer with the PyTorch layer's normalized_shape, e.g. "
            f"`eqxnorm.{type(layer).__name__}({shape})`."
        )
    if len(got) != 1:
        return (
            f"{_TORCH_TWINS[type(layer)]} stores one value per channel, of shape "
            f"(num_features,): check that the key belongs to such a layer."
        )
    constructor = {
        GroupNorm: f"eqxnorm.GroupNorm(groups, channels={got[0]})",
        InstanceNorm: f"eqxnorm.InstanceNorm({got[0]}, channelwise_affine=True)",
        BatchNorm: f"eqxnorm.BatchNorm({got[0]}, axis_name=...)",
    }[type(layer)]
    return (
        f"The PyTorch layer has {got[0]} channels: construct the layer to match, e.g. "
        f"`{constructor}`."
    )


def _read(
    layer: Any, name: str, like: Any, state_dict: Mapping[str, Any], prefix: str, where: str
) -> jax.Array:
    """`state_dict[prefix + name]` checked against `like` (shape) and cast to its dtype."""
    key = prefix + name
    array = _to_numpy(state_dict[key], key, where)
    expected = _torch_shape(layer, name, like)
    if array.shape != expected:
        raise ValueError(
            f"{where}: `{key}` has shape {array.shape}, but {_describe(layer)} expects shape "
            f"{expected} for it. {_shape_fix(layer, name, array.shape)}"
        )
    array = array.reshape(like.shape)
    if name == "num_batches_tracked":
        count = float(array)
        if not (count.is_integer() and 0 <= count <= _MAX_COUNT):
            raise ValueError(
                f"{where}: `{key}` must be a whole number of steps between 0 and {_MAX_COUNT}, "
                f"but got {array.item()!r}. Pass the PyTorch layer's num_batches_tracked as "
                f"saved."
            )
    return jnp.asarray(array, dtype=like.dtype)


def load_torch_state_dict(
    layer: LayerNorm | RMSNorm | GroupNorm | InstanceNorm | BatchNorm | GatedRMSNorm | WeightNorm,
    state_dict: Mapping[str, Any],
    state: State | None = None,
    *,
    prefix: str = "",
    strict: bool = True,
    weight_offset: float | None = None,
) -> (
    LayerNorm
    | RMSNorm
    | GroupNorm
    | InstanceNorm
    | BatchNorm
    | GatedRMSNorm
    | WeightNorm
    | tuple[Any, State]
):
    """Load the state dict of a PyTorch norm layer into an eqxnorm layer.

    The layer's parameters (and, for `BatchNorm`, the running statistics in `state`) are
    replaced by the state dict's values, cast to the dtypes they have now; `layer` and
    `state` themselves are left unchanged (and `state` stays valid). Since
    `torch.nn.RMSNorm` (and `torch.nn.LayerNorm` without a weight) has no bias, the bias of
    such an eqxnorm layer is set to zeros. A `BatchNorm`'s `running_mean` and `running_var`
    are copied unchanged (both libraries keep the unbiased variance) and
    `num_batches_tracked` becomes the state's step `count`, so that inference gives
    PyTorch's eval output. See the module documentation, `eqxnorm._torch_interop`, for the
    mapping of each layer and how training continues.

    ```python
    torch_bn = torch.nn.BatchNorm2d(16, momentum=0.1)  # ... trained
    bn, state = eqx.nn.make_with_state(eqxnorm.BatchNorm)(16, "batch", momentum=0.9)
    bn, state = eqxnorm.load_torch_state_dict(bn, torch_bn.state_dict(), state)
    ```

    **Arguments:**

    - `layer`: an `eqxnorm.LayerNorm`, `RMSNorm`, `GroupNorm`, `InstanceNorm`,
        `BatchNorm` or `WeightNorm`, constructed with the PyTorch layer's settings (shape,
        `eps`, groups, affine flags; `BatchNorm` momentum = 1 - PyTorch's momentum;
        `WeightNorm` wrapping a layer of the same sizes, `axis` = PyTorch's `dim`).
    - `state_dict`: PyTorch key names (`weight`, `bias`, `running_mean`, `running_var`,
        `num_batches_tracked`, each after `prefix`) to NumPy arrays, PyTorch tensors or
        anything `np.asarray` accepts, with PyTorch's shapes: `shape` for `LayerNorm` and
        `RMSNorm`, `(channels,)` for the others, `()` for `num_batches_tracked`. Keys not
        starting with `prefix` are ignored, so a whole model's state dict can be passed.
    - `state`: the [`equinox.nn.State`][] holding the layer's running statistics (or a
        whole model's); required for `BatchNorm`, passed through for the other layers.
    - `prefix`: prepended to each key, e.g. `"block.0.norm."` (with the trailing dot).
    - `strict`: `True` (the default) refuses keys under `prefix` that the layer has no
        place for; `False` ignores them. Missing keys are refused either way.
    - `weight_offset`: the offset the state dict's `weight` is stored against (1.0 for
        Gemma's zero-centred RMSNorm, 0.0 for `torch.nn`'s); default: the layer's own
        `weight_offset`, so the array is copied. Otherwise the layer's weight becomes
        `weight + weight_offset - layer.weight_offset`, computed in float32.

    **Returns:**

    The new layer, or `(layer, state)` when `state` is given, with the running statistics
    and step count (`num_batches_tracked`) of a `BatchNorm` set in the new state.

    **Raises:**

    `TypeError` for an unsupported layer type, a `state` that is not an `eqx.nn.State`, or a
    value that is not an array of real numbers; `ValueError` for a `BatchNorm` without
    `state` (or with a state not made with it), a missing key, an unexpected key when
    `strict`, a value whose shape does not fit (naming the key, both shapes and the fix),
    or a `num_batches_tracked` that is not a whole number in [0, 2**31).
    """
    where = "load_torch_state_dict"
    kind = _kind(layer, where)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"{where}: `state_dict` must be a mapping from key names to arrays, like PyTorch's "
            f"`module.state_dict()`, but got an object of type {type(state_dict).__name__}."
        )
    if not isinstance(prefix, str):
        raise TypeError(
            f"{where}: `prefix` must be a string such as 'block.0.norm.', but got {prefix!r}."
        )
    targets = _params(layer)
    if kind is BatchNorm:
        mean, var, count = _running(layer, state, where)
        targets |= {"running_mean": mean, "running_var": var, "num_batches_tracked": count}
    shift = _offset_shift(layer, weight_offset, where)
    names = list(targets)
    _check_keys(layer, names, state_dict, prefix, strict, where)
    values = {n: _read(layer, n, like, state_dict, prefix, where) for n, like in targets.items()}
    if shift and "weight" in values:
        weight = values["weight"]
        values["weight"] = (weight.astype(jnp.float32) + shift).astype(weight.dtype)

    if kind is WeightNorm:
        slots = _weight_norm_slots(layer)
        layer = eqx.tree_at(
            lambda m: tuple(get(m) for get in slots.values()),
            layer,
            tuple(values[name] for name in slots),
        )
        return layer if state is None else (layer, state)
    fields = [n for n in ("weight", "bias") if n in values]
    replacements = [values[n] for n in fields]
    if _dropped_bias(layer):
        fields.append("bias")
        replacements.append(jnp.zeros_like(layer.bias))
    if fields:
        layer = eqx.tree_at(
            lambda m: tuple(getattr(m, n) for n in fields), layer, tuple(replacements)
        )
    if kind is BatchNorm:
        # A copy, so that `set` invalidates it rather than the caller's state.
        state = jax.tree_util.tree_map(lambda leaf: leaf, state)
        state = state.set(layer.running_index, (values["running_mean"], values["running_var"]))
        state = state.set(layer.count_index, values["num_batches_tracked"])
    return layer if state is None else (layer, state)


def torch_state_dict(
    layer: LayerNorm | RMSNorm | GroupNorm | InstanceNorm | BatchNorm | GatedRMSNorm | WeightNorm,
    state: State | None = None,
    *,
    prefix: str = "",
    weight_offset: float | None = None,
) -> dict[str, np.ndarray]:
    """Export an eqxnorm layer as the state dict of its PyTorch twin.

    The result has PyTorch's keys (in PyTorch's order), shapes and conventions, and loads
    into the PyTorch layer of the same settings with
    `module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`; the PyTorch
    layer then computes what the eqxnorm layer computes (for `BatchNorm`, PyTorch's eval
    mode is eqxnorm's inference with `state`). See the module documentation,
    `eqxnorm._torch_interop`, for the mapping.

    **Arguments:**

    - `layer`: an `eqxnorm.LayerNorm`, `RMSNorm`, `GroupNorm`, `InstanceNorm`,
        `BatchNorm` or `WeightNorm`.
    - `state`: the [`equinox.nn.State`][] holding a `BatchNorm`'s running statistics (or a
        whole model's); required for `BatchNorm`, ignored for the other layers.
    - `prefix`: prepended to each key, e.g. `"block.0.norm."`.
    - `weight_offset`: the offset the exported `weight` is stored against (0.0 for
        `torch.nn.RMSNorm`, 1.0 for Gemma's); default: the layer's own `weight_offset`.

    **Returns:**

    A dict from key names to new NumPy arrays: `weight` and `bias` in the parameters' dtype
    (bfloat16 as float32, which holds it exactly and which PyTorch can read), a
    `BatchNorm`'s `running_mean` and `running_var` in the state's dtype, and its
    `num_batches_tracked` as an int64 scalar, as PyTorch stores it. A layer without
    parameters or statistics gives an empty dict.

    **Raises:**

    `TypeError` for an unsupported layer type, or a `state` that is not an `eqx.nn.State`;
    `ValueError` for a `BatchNorm` without `state` (or with a state not made with it), and
    for a nonzero bias that PyTorch's twin cannot hold (an `RMSNorm`'s, or a `LayerNorm`'s
    without a weight).
    """
    where = "torch_state_dict"
    kind = _kind(layer, where)
    if not isinstance(prefix, str):
        raise TypeError(
            f"{where}: `prefix` must be a string such as 'block.0.norm.', but got {prefix!r}."
        )
    if _dropped_bias(layer) and np.any(np.asarray(layer.bias) != 0):
        if isinstance(layer, RMSNorm):
            fix = (
                "torch.nn.RMSNorm has no bias, so PyTorch cannot hold this layer. Train the "
                "RMSNorm with `use_bias=False` (as most transformers do), or add the bias "
                "after torch.nn.RMSNorm in your PyTorch model yourself."
            )
        else:
            fix = (
                "torch.nn.LayerNorm has no bias without a weight (elementwise_affine=False "
                "drops both), so PyTorch cannot hold this layer. Use "
                "`eqxnorm.LayerNorm(..., use_weight=True)`, whose weight of ones changes "
                "nothing, and load it into torch.nn.LayerNorm(elementwise_affine=True)."
            )
        raise ValueError(f"{where}: {_describe(layer)} has a nonzero bias, but {fix}")
    arrays = dict(_params(layer))
    shift = _offset_shift(layer, weight_offset, where)
    if shift and "weight" in arrays:
        arrays["weight"] = arrays["weight"].astype(jnp.float32) - shift
    if kind is BatchNorm:
        mean, var, count = _running(layer, state, where)
        arrays |= {"running_mean": mean, "running_var": var}
    exported = {}
    for name, value in arrays.items():
        array = np.array(value).reshape(_torch_shape(layer, name, value))
        if array.dtype not in _TORCH_READABLE:
            array = array.astype(np.float32)
        exported[prefix + name] = array
    if kind is BatchNorm:
        exported[prefix + "num_batches_tracked"] = np.array(count, dtype=np.int64)
    return exported
