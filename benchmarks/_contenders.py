"""The contenders: each library's way of computing every op, as a pure function of its inputs.

A JAX contender turns a [`Problem`][benchmarks._ops.Problem] into a [`JaxCase`][]: a function
`fn(args) -> outputs` of a pytree of device arrays, which `benchmarks._timing` jits, vjps and
times. A PyTorch contender gives a [`TorchCase`][] the same way. Every contender converts the
problem's NumPy arrays itself (outside the timing), so all of them compute on the same values;
Flax gets the channel ops' arrays in its own layout, channels last.

A contender that cannot run a case raises [`Skip`][] with the reason, which the report shows.
"""

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._ops import EPS, EQXNORM_ONLY, FP8_DTYPE, FP8_SCALE, Op, Problem, kernel_name


class Skip(Exception):
    """Raised by a contender that cannot run a case; the message says why."""


@dataclasses.dataclass(frozen=True)
class JaxCase:
    """`fn(args)` returns a tuple of outputs (as `Op.outputs`); `cotangents` match them."""

    fn: Callable[[Any], tuple[jax.Array, ...]]
    args: Any
    cotangents: tuple[jax.Array, ...]
    note: str = ""


@dataclasses.dataclass(frozen=True)
class TorchCase:
    """`fn(tensors)` returns a tuple of outputs; `tensors` are the differentiable inputs."""

    fn: Callable[..., tuple[Any, ...]]
    tensors: dict[str, Any]
    cotangents: tuple[Any, ...]
    device: Any
    compiled: bool = False
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Contender:
    """A named way of computing the ops.

    - `kind`: `"jax"`, `"torch"` or `"copy"` (the roofline, timed by `benchmarks._timing`).
    - `build`: `Problem -> JaxCase | TorchCase`, raising [`Skip`][] when it cannot.
    - `check`: `() -> reason | None`, why the contender cannot run at all here (not installed).
    - `fused_only`: runs only the fused ops (the unfused sequences).
    """

    name: str
    kind: str
    description: str
    build: Callable[[Problem], Any] | None = None
    check: Callable[[], str | None] = lambda: None
    fused_only: bool = False


def _jax_arrays(problem: Problem, layout: Callable[[str, np.ndarray], np.ndarray] | None = None):
    """The problem's arrays and cotangents on the default JAX device (optionally re-laid)."""
    relay = layout or (lambda name, a: a)
    args = {k: jnp.asarray(relay(k, v)) for k, v in problem.arrays.items()}
    cts = tuple(jnp.asarray(relay("x", c)) for c in problem.cotangents)
    if problem.op.out_itemsize is not None:
        # The FP8 output's cotangent is float8 (JAX's rule: a tangent has its primal's dtype);
        # the amax's is float32.
        cts = (cts[0].astype(FP8_DTYPE), cts[1].astype(jnp.float32))
    return args, cts


def _norm_then_cast(y):
    """`(y_fp8, amax)` of an output already rounded to the input's dtype, in XLA: what a norm
    without an FP8 output leaves to the user (a second pass over `y`)."""
    from eqxnorm.kernels.reference import quantize_fp8

    return quantize_fp8(y.astype(jnp.float32), jnp.float32(FP8_SCALE), FP8_DTYPE)


def _modulate(y, scale, shift):
    """adaLN's modulation as users write it after a plain norm: per example, over tokens."""
    return y * (1 + scale[:, None, :]) + shift[:, None, :]


def _sequence(op: Op, norm: Callable) -> Callable:
    """`fn(args) -> outputs` for `op` from a library's plain norm `norm(args, x) -> y` (for the
    fused ops: `op.base`, without parameters for adaLN), composed as users write it: the
    residual add before the norm, the modulation after it."""
    if op.name == "adaptive_layer_norm":

        def fn(a):
            return (_modulate(norm(a, a["x"]), a["scale"], a["shift"]),)

    elif op.name == "qk_norm":

        def fn(a):
            return norm(a, a["x"]), norm({"weight": a["k_weight"]}, a["k"])

    elif op.name == "gated_rms_norm":

        def fn(a):
            return (norm(a, a["x"]) * jax.nn.silu(a["z"]),)
    elif op.out_itemsize is not None:

        def fn(a):
            return _norm_then_cast(norm(a, a["x"]))

    elif op.fused:

        def fn(a):
            h = a["x"] + a["residual"]
            return norm(a, h), h

    else:

        def fn(a):
            return (norm(a, a["x"]),)

    return fn


def _composed_note(op: Op, norm: str) -> str:
    if op.name == "adaptive_layer_norm":
        return f"{norm}, then the modulation"
    if op.name == "qk_norm":
        return f"{norm} of q, then of k: two launches"
    if op.name == "gated_rms_norm":
        return f"{norm}, then · silu(z)"
    if op.out_itemsize is not None:
        return f"{norm}, then amax and the scaled cast to {FP8_DTYPE} in XLA"
    return f"x + residual, then {norm}" if op.fused else ""


# --- eqxnorm -----------------------------------------------------------------------------------


def _eqxnorm_norm(name: str, problem: Problem, impl: str) -> Callable:
    """`(args, x) -> y`: the plain norm `name` through `eqxnorm.functional`."""
    import eqxnorm.functional as F

    kw = dict(eps=EPS, impl=impl)

    def norm(a, x):
        weight, bias = a.get("weight"), a.get("bias")
        if name == "layer_norm":
            return F.layer_norm(x, weight, bias, **kw)
        if name == "rms_norm":
            return F.rms_norm(x, weight, **kw)
        if name == "group_norm":
            return F.group_norm(x, problem.groups, weight, bias, **kw)
        if name == "instance_norm":
            return F.instance_norm(x, weight, bias, **kw)
        return F.batch_norm(x, weight, bias, **kw)[0]

    return norm


def _require_eqxnorm(name: str, kernel: str, impl: str) -> None:
    import eqxnorm.functional

    if not hasattr(eqxnorm.functional, name):
        raise Skip(f"eqxnorm.functional.{name} does not exist in this version of eqxnorm")
    if impl in ("pallas", "mosaic_gpu"):
        import eqxnorm.kernels.pallas

        if not hasattr(eqxnorm.kernels.pallas, kernel):
            raise Skip(f"eqxnorm has no Pallas kernel for {name} yet")


def _interpret_note(impl: str) -> str:
    on_cpu = jax.default_backend() == "cpu"
    kernels = impl in ("pallas", "mosaic_gpu")
    return "interpret mode on CPU: not a speed figure" if kernels and on_cpu else ""


def eqxnorm_fused(impl: str) -> Callable[[Problem], JaxCase]:
    """eqxnorm's own entry point for every op, with `impl=impl`."""

    def build(problem: Problem) -> JaxCase:
        import eqxnorm.functional as F

        op = problem.op
        # An FP8 output is an option of its kernel's function.
        _require_eqxnorm(kernel_name(op) if op.out_itemsize else op.name, kernel_name(op), impl)
        kw = dict(eps=EPS, impl=impl)
        if op.name == "add_layer_norm":

            def fn(a):
                return F.add_layer_norm(a["x"], a["residual"], a["weight"], a["bias"], **kw)

        elif op.name == "add_rms_norm":

            def fn(a):
                return F.add_rms_norm(a["x"], a["residual"], a["weight"], **kw)

        elif op.name == "adaptive_layer_norm":

            def fn(a):
                return (F.adaptive_layer_norm(a["x"], a["scale"], a["shift"], **kw),)

        elif op.name == "qk_norm":

            def fn(a):
                return F.qk_norm(a["x"], a["k"], a["weight"], a["k_weight"], **kw)

        elif op.name == "gated_rms_norm":

            def fn(a):
                return (F.gated_rms_norm(a["x"], a["z"], a["weight"], **kw),)

        elif op.name == "dyt":

            def fn(a):
                return (F.dyt(a["x"], a["alpha"], a["weight"], a["bias"], impl=impl),)
        elif op.name == "rms_norm_fp8":
            fp8 = dict(out_dtype=FP8_DTYPE, fp8_scale=jnp.float32(FP8_SCALE))

            def fn(a):
                return F.rms_norm(a["x"], a["weight"], **fp8, **kw)

        else:
            fn = _sequence(op, _eqxnorm_norm(op.name, problem, impl))
        args, cts = _jax_arrays(problem)
        return JaxCase(fn, args, cts, _interpret_note(impl))

    return build


def eqxnorm_unfused(impl: str) -> Callable[[Problem], JaxCase]:
    """The unfused sequence a fused op replaces: the add (or the modulation) in XLA around
    eqxnorm's plain norm with `impl=impl`."""

    def build(problem: Problem) -> JaxCase:
        op = problem.op
        if not op.fused:
            raise Skip("only the fused ops have an unfused sequence")
        _require_eqxnorm(op.base, op.base, impl)
        fn = _sequence(op, _eqxnorm_norm(op.base, problem, impl))
        what = _composed_note(op, f"{op.base}(impl={impl!r})")
        args, cts = _jax_arrays(problem)
        return JaxCase(fn, args, cts, "; ".join(filter(None, (what, _interpret_note(impl)))))

    return build


# --- eqx.nn ------------------------------------------------------------------------------------


def _with_params(layer, a: dict):
    """An Equinox layer with its `weight`/`bias` replaced by the problem's."""
    import equinox as eqx

    names = [n for n in ("weight", "bias") if getattr(layer, n, None) is not None]
    if not names:
        return layer
    return eqx.tree_at(lambda m: [getattr(m, n) for n in names], layer, [a[n] for n in names])


def _over_rows(fn: Callable, *arrays):
    """`jax.vmap(fn)` over every leading axis of `(*rows, dim)` arrays, one row per call."""
    flat = [x.reshape(-1, x.shape[-1]) for x in arrays]
    out = jax.vmap(fn)(*flat)
    return jax.tree.map(lambda y: y.reshape(arrays[0].shape), out)


def _eqx_norm(name: str, problem: Problem, nn=None) -> Callable:
    """`(args, x) -> y` with the layer of `nn` (`eqx.nn` by default; `eqxnorm`, whose layers
    take the same arguments), `jax.vmap`ped over the batch as Equinox users do (row norms: over
    every leading axis), its parameters replaced by the problem's."""
    import equinox as eqx

    nn = eqx.nn if nn is None else nn
    dim = problem.x.shape[-1]
    channels = problem.x.shape[1] if problem.op.family == "channel" else 0
    with_params = _with_params

    def rows(layer):
        def norm(a, x):
            return _over_rows(with_params(layer, a), x)

        return norm

    def per_example(layer):
        def norm(a, x):
            return jax.vmap(with_params(layer, a))(x)

        return norm

    if problem.op.name == "adaptive_layer_norm":
        return rows(nn.LayerNorm(dim, eps=EPS, use_weight=False, use_bias=False))
    if name == "layer_norm":
        return rows(nn.LayerNorm(dim, eps=EPS))
    if name == "rms_norm":
        return rows(nn.RMSNorm(dim, eps=EPS, use_bias=False))
    if name == "group_norm":
        return per_example(nn.GroupNorm(problem.groups, channels, eps=EPS))
    if name == "instance_norm":
        instance = getattr(nn, "InstanceNorm", None)
        layer = (
            nn.GroupNorm(channels, channels, eps=EPS)
            if instance is None
            else instance(channels, eps=EPS)
        )
        return per_example(layer)
    layer, state = eqx.nn.make_with_state(nn.BatchNorm)(channels, "batch", eps=EPS, mode="batch")

    def batch_norm(a, x):
        over_batch = dict(axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        y, _ = jax.vmap(with_params(layer, a), **over_batch)(x, state)
        return y

    return batch_norm


_EQX_NOTES = {
    "instance_norm": "eqx.nn.GroupNorm(C, C)",
    "batch_norm": "eqx.nn.BatchNorm(mode='batch') under vmap(axis_name)",
}


def _eqxnorm_only(op: Op, library: str) -> None:
    if op.name in EQXNORM_ONLY:
        raise Skip(f"{library} has no {op.title}")


def eqx_build(problem: Problem) -> JaxCase:
    op = problem.op
    _eqxnorm_only(op, "Equinox")
    fn = _sequence(op, _eqx_norm(op.base or op.name, problem))
    layer = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}.get(op.base, "")
    note = _composed_note(op, f"vmap(eqx.nn.{layer})") if op.fused else _EQX_NOTES.get(op.name, "")
    args, cts = _jax_arrays(problem)
    return JaxCase(fn, args, cts, note)


def module_build(problem: Problem) -> JaxCase:
    """eqxnorm's layers as users call them: one example per call, `jax.vmap`ped over the batch
    (the fused ops through `LayerNorm.add_and_norm` / `RMSNorm.add_and_norm`, adaLN through
    `functional.adaptive_layer_norm` on one example, as `AdaptiveLayerNorm` calls it after
    its projection), with `impl="auto"`. The targets on CPU are judged on these rows."""
    import eqxnorm
    import eqxnorm.functional as F

    op = problem.op
    if op.out_itemsize is not None:
        raise Skip("the FP8 output is a functional option; see the pallas and reference rows")
    _require_eqxnorm(op.name, kernel_name(op), "auto")
    # Their modules call the functional timed by `reference`/`pallas` on each example.
    _eqxnorm_only(op, "this contender's module set")
    dim = problem.x.shape[-1]
    if op.name in ("add_layer_norm", "add_rms_norm"):
        layer_cls = eqxnorm.LayerNorm if op.base == "layer_norm" else eqxnorm.RMSNorm
        layer = layer_cls(dim, eps=EPS, **({} if op.base == "layer_norm" else {"use_bias": False}))

        def fn(a):
            return _over_rows(_with_params(layer, a).add_and_norm, a["x"], a["residual"])

        note = f"vmap({layer_cls.__name__}.add_and_norm)"
    elif op.name == "adaptive_layer_norm":

        def example(x, scale, shift):
            return F.adaptive_layer_norm(x, scale, shift, eps=EPS)

        def fn(a):
            return (jax.vmap(example)(a["x"], a["scale"], a["shift"]),)

        note = "vmap(functional.adaptive_layer_norm) per example"
    else:
        fn = _sequence(op, _eqx_norm(op.name, problem, eqxnorm))
        note = _EQX_NOTES.get(op.name, "").replace("eqx.nn.GroupNorm(C, C)", "InstanceNorm")
        note = note.replace("eqx.nn.", "")
    args, cts = _jax_arrays(problem)
    return JaxCase(fn, args, cts, note)


# --- Flax NNX ----------------------------------------------------------------------------------


def _channels_last(name: str, a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if name == "x" else a


def _flax_layer(problem: Problem):
    from flax import nnx

    op = problem.op
    dtype = jnp.dtype(problem.dtype)
    kw = dict(epsilon=EPS, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    features = problem.x.shape[1] if op.family == "channel" else problem.x.shape[-1]
    name = op.base or op.name
    if op.name == "adaptive_layer_norm":
        return nnx.LayerNorm(features, use_scale=False, use_bias=False, **kw)
    if name == "layer_norm":
        return nnx.LayerNorm(features, **kw)
    if name == "rms_norm":
        return nnx.RMSNorm(features, **kw)
    if name == "group_norm":
        return nnx.GroupNorm(features, num_groups=problem.groups, **kw)
    if name == "instance_norm":
        return nnx.InstanceNorm(features, **kw)
    return nnx.BatchNorm(features, use_running_average=False, **kw)


def flax_build(problem: Problem) -> JaxCase:
    """Flax NNX layers, `nnx.split` into a graph and states and `nnx.merge`d inside the
    function, so what is jitted and differentiated is a pure function of the parameters. The
    channel ops get channels-last arrays, Flax's layout."""
    from flax import nnx

    op = problem.op
    _eqxnorm_only(op, "Flax NNX")
    layer = _flax_layer(problem)
    for param, source in (("scale", "weight"), ("bias", "bias")):
        if source in problem.arrays and getattr(layer, param, None) is not None:
            setattr(layer, param, nnx.Param(jnp.asarray(problem.arrays[source])))
    graph, params, rest = nnx.split(layer, nnx.Param, ...)

    def norm(a, x):
        # The batch statistics travel as an argument: BatchNorm updates them, and Flax refuses
        # to mutate a variable created outside the trace.
        return nnx.merge(graph, a["params"], a["rest"])(x)

    channel = op.family == "channel"
    args, cts = _jax_arrays(problem, _channels_last if channel else None)
    args = {k: v for k, v in args.items() if k not in ("weight", "bias")}
    args |= {"params": params, "rest": rest}
    layout = "channels last (Flax's layout)" if channel else ""
    note = _composed_note(op, f"nnx.{type(layer).__name__}") or layout
    return JaxCase(_sequence(op, norm), args, cts, note)


# --- PyTorch -----------------------------------------------------------------------------------


def torch_device():
    """CUDA when JAX runs on a GPU and PyTorch has CUDA, else the CPU (`Skip` when JAX is on a
    GPU but PyTorch is not: CPU timings would not compare)."""
    import torch

    if jax.default_backend() == "cpu":
        return torch.device("cpu")
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return torch.device("cuda")
    raise Skip(f"PyTorch has no device matching JAX's {jax.default_backend()!r} backend")


def _torch_tensors(problem: Problem, device) -> tuple[dict[str, Any], tuple[Any, ...]]:
    import torch

    dtype = getattr(torch, problem.dtype)

    def convert(a, grad):
        # Via float32: exact for bfloat16/float16, which NumPy-to-torch cannot pass directly.
        t = torch.from_numpy(np.asarray(a, np.float32)).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    tensors = {k: convert(v, True) for k, v in problem.arrays.items()}
    return tensors, tuple(convert(c, False) for c in problem.cotangents)


def _torch_norm(name: str, problem: Problem, device) -> Callable:
    """`(tensors, x) -> y`: the plain norm `name` through `torch.nn.functional`."""
    import torch
    import torch.nn.functional as F

    dim = problem.x.shape[-1]
    if name == "batch_norm":
        # nn.BatchNorm2d's training step: batch statistics, running statistics updated.
        channels = problem.x.shape[1]
        dtype = getattr(torch, problem.dtype)
        running_mean = torch.zeros(channels, dtype=dtype, device=device)
        running_var = torch.ones(channels, dtype=dtype, device=device)

    def norm(t, x):
        weight, bias = t.get("weight"), t.get("bias")
        if name == "layer_norm":
            return F.layer_norm(x, (dim,), weight, bias, EPS)
        if name == "rms_norm":
            return F.rms_norm(x, (dim,), weight, EPS)
        if name == "group_norm":
            return F.group_norm(x, problem.groups, weight, bias, EPS)
        if name == "instance_norm":
            return F.instance_norm(x, weight=weight, bias=bias, eps=EPS)
        return F.batch_norm(x, running_mean, running_var, weight, bias, training=True, eps=EPS)

    return norm


def _torch_fn(problem: Problem, device) -> tuple[Callable, str]:
    op = problem.op
    _eqxnorm_only(op, "torch.nn")
    if op.out_itemsize is not None:
        raise Skip("torch.nn has no FP8-output norm (TransformerEngine's is CUDA only)")
    name = op.base or op.name
    fn = _sequence(op, _torch_norm(name, problem, device))
    plain = "F.batch_norm(training=True)" if op.name == "batch_norm" else ""
    return fn, _composed_note(op, f"F.{name}") or plain


def torch_build(problem: Problem) -> TorchCase:
    device = torch_device()
    fn, note = _torch_fn(problem, device)
    tensors, cts = _torch_tensors(problem, device)
    return TorchCase(fn, tensors, cts, device, note=note)


def torch_compile_build(problem: Problem) -> TorchCase:
    """The eager function through `torch.compile(dynamic=False)`: one graph per shape, as
    `jax.jit` specializes. Dynamo's caches are reset per case so no recompile limit is hit
    (which would fall back to eager silently)."""
    import torch

    device = torch_device()
    broken = _torch_compile_works()
    if broken is not None:
        raise Skip(broken)
    fn, note = _torch_fn(problem, device)
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=False)
    tensors, cts = _torch_tensors(problem, device)
    note = "; ".join(filter(None, ("inductor, dynamic=False", note)))
    return TorchCase(compiled, tensors, cts, device, compiled=True, note=note)


def _check_torch() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not installed (pip install torch)"
    try:
        torch_device()
    except Skip as skip:
        return str(skip)
    return None


def _check_torch_compile() -> str | None:
    reason = _check_torch()
    if reason is not None:
        return reason
    import torch

    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    return None


@functools.cache
def _torch_compile_works() -> str | None:
    """Why `torch.compile` fails here (`None` if it works). Dynamo refuses some Python versions
    and inductor needs a C++ compiler on CPU: one tiny compile tells, rather than a failure per
    case."""
    import torch

    try:
        torch._dynamo.reset()
        torch.compile(lambda t: t * 2 + 1, dynamic=False)(torch.ones(4, device=torch_device()))
    except Exception as error:  # any compiler failure means: no torch.compile here
        return f"torch.compile does not work here: {_first_line(error)}"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


# --- Liger-Kernel ------------------------------------------------------------------------------


def liger_build(problem: Problem) -> TorchCase:
    """Liger-Kernel's Triton modules (GPU only), with the problem's weights."""
    import torch

    _eqxnorm_only(problem.op, "this contender (Liger's DyT is not wired in)")

    device = torch_device()
    if device.type != "cuda":
        raise Skip("Liger-Kernel runs on CUDA GPUs only")
    transformers = importlib.import_module("liger_kernel.transformers")
    op = problem.op
    dim = problem.x.shape[-1]
    classes = {
        "layer_norm": ("LigerLayerNorm", dict(bias=True)),
        "rms_norm": ("LigerRMSNorm", dict(in_place=False)),
        "add_rms_norm": ("LigerFusedAddRMSNorm", dict(in_place=False)),
    }
    if op.name not in classes or not hasattr(transformers, classes[op.name][0]):
        raise Skip(f"this Liger-Kernel has no {op.name}")
    name, extra = classes[op.name]
    cls = getattr(transformers, name)
    try:
        module = cls(dim, eps=EPS, **extra)
    except TypeError:  # older releases lack the keyword
        module = cls(dim, eps=EPS)
    module = module.to(device=device, dtype=getattr(torch, problem.dtype))
    tensors, cts = _torch_tensors(problem, device)
    with torch.no_grad():
        module.weight.copy_(tensors["weight"])
        if "bias" in tensors:
            module.bias.copy_(tensors["bias"])
    weights = {"weight": module.weight} | ({"bias": module.bias} if "bias" in tensors else {})
    tensors = {k: v for k, v in tensors.items() if k not in weights} | weights

    def fn(t):
        return tuple(module(t["x"], t["residual"])) if op.fused else (module(t["x"]),)

    return TorchCase(fn, tensors, cts, device, note=name)


def _check_liger() -> str | None:
    reason = _check_torch()
    if reason is not None:
        return reason
    if jax.default_backend() != "gpu":
        return "Liger-Kernel runs on CUDA GPUs only"
    try:
        importlib.import_module("liger_kernel.transformers")
    except ImportError:
        return "Liger-Kernel is not installed (pip install liger-kernel)"
    return None


# --- tokamax ------------------------------------------------------------------------------------


def tokamax_build(problem: Problem) -> JaxCase:
    """tokamax's `layer_norm` (`subtract_mean=False` for RMSNorm) with its Triton kernel
    (GPU only); the fused ops as the sequence around it."""
    tokamax = importlib.import_module("tokamax")
    op = problem.op
    name = op.base or op.name
    if name not in ("layer_norm", "rms_norm") or op.name == "adaptive_layer_norm":
        raise Skip(f"tokamax has no {op.name}")

    def norm(a, x):
        bias = a.get("bias") if name == "layer_norm" else None
        return tokamax.layer_norm(
            x,
            a.get("weight"),
            bias,
            epsilon=EPS,
            subtract_mean=name == "layer_norm",
            implementation="triton",
        )

    args, cts = _jax_arrays(problem)
    note = _composed_note(op, "tokamax.layer_norm") or "tokamax.layer_norm(implementation='triton')"
    return JaxCase(_sequence(op, norm), args, cts, note)


def _check_tokamax() -> str | None:
    if jax.default_backend() != "gpu":
        return "tokamax's normalization kernel is Triton: GPU only"
    try:
        importlib.import_module("tokamax")
    except ImportError:
        return "tokamax is not installed (pip install tokamax)"
    return None


def _check_mosaic_gpu() -> str | None:
    from eqxnorm.kernels import _mosaic_gpu

    if not _mosaic_gpu.usable():
        return f"the Mosaic GPU kernels need JAX 0.12+ (this is {jax.__version__})"
    if jax.default_backend() == "gpu" and not _mosaic_gpu.target_supported():
        return "the Mosaic GPU kernels need compute capability 9.0+ (TMA)"
    return None


def _check_flax() -> str | None:
    try:
        importlib.import_module("flax.nnx")
    except ImportError:
        return "Flax is not installed (pip install flax)"
    return None


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender(
            "pallas",
            "jax",
            "eqxnorm, impl='pallas': the fused kernels (interpret mode on CPU)",
            eqxnorm_fused("pallas"),
        ),
        Contender(
            "reference",
            "jax",
            "eqxnorm, impl='reference': jax.numpy, XLA-jitted",
            eqxnorm_fused("reference"),
        ),
        Contender(
            "pallas-unfused",
            "jax",
            "fused ops only: the add/modulation in XLA around eqxnorm's Pallas norm",
            eqxnorm_unfused("pallas"),
            fused_only=True,
        ),
        Contender(
            "xla-unfused",
            "jax",
            "fused ops only: the add/modulation in XLA around eqxnorm's reference norm",
            eqxnorm_unfused("reference"),
            fused_only=True,
        ),
        Contender(
            "mosaic_gpu",
            "jax",
            "eqxnorm, impl='mosaic_gpu': the Mosaic GPU kernels pinned, where impl='auto' "
            "runs the row norms on Triton (Hopper+, JAX 0.12+; interpret mode on CPU)",
            eqxnorm_fused("mosaic_gpu"),
            _check_mosaic_gpu,
        ),
        Contender(
            "module",
            "jax",
            "eqxnorm's layers, impl='auto', vmapped over the batch as users call them",
            module_build,
        ),
        Contender("eqx", "jax", "equinox.nn layers, vmapped over the batch", eqx_build),
        Contender("flax", "jax", "Flax NNX layers (split/merge, jitted)", flax_build, _check_flax),
        Contender(
            "torch", "torch", "PyTorch eager (torch.nn.functional)", torch_build, _check_torch
        ),
        Contender(
            "torch.compile",
            "torch",
            "the PyTorch function through torch.compile (inductor)",
            torch_compile_build,
            _check_torch_compile,
        ),
        Contender("liger", "torch", "Liger-Kernel (Triton, GPU only)", liger_build, _check_liger),
        Contender(
            "tokamax",
            "jax",
            "tokamax.layer_norm, its Triton kernel (GPU only)",
            tokamax_build,
            _check_tokamax,
        ),
        Contender("copy", "copy", "a device copy of the same bytes: the roofline"),
    )
}


# Left out of the CPU default, with the reason; `--impls` still runs them there.
CPU_OPT_IN = {
    "pallas": "interpret mode on CPU is an exact emulation, not a speed figure",
    "pallas-unfused": "interpret mode on CPU is an exact emulation, not a speed figure",
    "mosaic_gpu": "interpret mode on CPU is an exact emulation, not a speed figure",
    "torch.compile": "inductor's cold C++ compiles cost about 5 s per case on a 2-core CPU, "
    "more than the rest of the quick run",
    "liger": "Liger-Kernel runs on CUDA GPUs only",
    "tokamax": "tokamax's normalization kernel is Triton: GPU only",
}


def default_contenders(backend: str) -> tuple[str, ...]:
    """Every contender, less on CPU those in `CPU_OPT_IN`."""
    names = tuple(CONTENDERS)
    if backend == "cpu":
        names = tuple(n for n in names if n not in CPU_OPT_IN)
    return names
