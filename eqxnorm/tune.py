r"""Tune eqxnorm's kernels for this device: `python -m eqxnorm.tune`.

For each op, shape and dtype asked for, times a training step (the forward, and the backward
to the input and the parameters) with the XLA reference and with the kernels under every
variant of the block configuration their heuristic would choose (`block_rows`, and on Triton
`num_warps`, halved, kept or doubled; on Mosaic GPU, rows staged in tiles also folded, one a
program, where the kernel takes folded rows), and writes the fastest to the tuning cache, which the
kernels read when they are traced; `impl="auto"` then runs the XLA reference for the launches
it measured faster. On a GPU both kernel backends are tuned that run there (Triton, and Mosaic
GPU on Hopper and newer with JAX 0.12+), and the kernels (`impl="auto"` and `"pallas"`) then
run on the one measured faster for each call; on a TPU, Mosaic.

```
python -m eqxnorm.tune --ops layer_norm rms_norm --shapes 4096x1024 8192x4096 --dtypes bfloat16
python -m eqxnorm.tune --ops group_norm batch_norm --shapes 32x128x56x56
```

Every kernel family of `eqxnorm.functional` is tuned ([`OPS`][]), each op on the shapes of
its form: rows × features for the row norms, examples × tokens × features for adaLN, tokens ×
heads × head_dim for QK-norm, batch × channels × spatial axes for GroupNorm and BatchNorm.

The cache is `$EQXNORM_TUNING_CACHE`, else `~/.cache/eqxnorm/tuning.json`
(`$XDG_CACHE_HOME/eqxnorm/tuning.json`); entries are keyed by the device kind, kernel backend,
op, dtype, and the rows and width of each launch rounded up to powers of two, and are used
only with the JAX version they were measured with. Rerun after upgrading JAX or eqxnorm.
"""

import argparse
import json
import math
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._dispatch import IMPLEMENTATIONS
from .kernels import _mosaic_gpu, _tuning


class Op(NamedTuple):
    """An op the tuner builds a training step for: its `operands` besides the first (`x`, or
    QK-norm's `q`); the numbers of `axes` its shapes may have; how many of its outputs get a
    cotangent (`outputs`: add + norm's `(y, h)`, QK-norm's `(q, k)`; BatchNorm's mean and
    variance none); whether it takes `eps`; and whether its shapes are `(batch, channels,
    *spatial)` (`channels`, the group norms and BatchNorm) rather than `(rows, features)`."""

    operands: tuple[str, ...]
    axes: tuple[int, ...] = (2,)
    outputs: int = 1
    eps: bool = True
    channels: bool = False


_PARAMS = ("weight", "bias")
# The ops the tuner builds a training step for: eqxnorm's kernel families, by the name of
# their function in `eqxnorm.functional` (and in `eqxnorm.kernels.pallas`).
OPS = {
    "layer_norm": Op(_PARAMS),
    "rms_norm": Op(_PARAMS),
    "add_layer_norm": Op(("residual", *_PARAMS), outputs=2),
    "add_rms_norm": Op(("residual", *_PARAMS), outputs=2),
    # (examples, tokens, features), a scale and shift per example.
    "adaptive_layer_norm": Op(("scale", "shift", *_PARAMS), axes=(3,)),
    "adaptive_rms_norm": Op(("scale", "shift", *_PARAMS), axes=(3,)),
    "gated_rms_norm": Op(("z", "weight")),
    "dyt": Op(("alpha", *_PARAMS), eps=False),
    # (tokens, heads, head_dim), q and k alike.
    "qk_norm": Op(("k", "q_weight", "k_weight"), axes=(3,), outputs=2),
    # (batch, channels, *spatial), the spatial axes flattened.
    "group_norm": Op(_PARAMS, axes=(3, 4, 5), channels=True),
    "batch_norm": Op(_PARAMS, axes=(3, 4, 5), channels=True),
}
EPS = 1e-5
# GroupNorm's groups: 32, as in most vision models, or the largest count dividing the channels.
GROUPS = 32


class Candidate(NamedTuple):
    """What one timing runs: `impl` (`"reference"` for XLA, else a kernel implementation),
    the kernel `backend` whose launches it configures (`None` for XLA), the configuration
    fields pinned per launch key (`configs`, empty for XLA; see `_tuning.pinned`) and a
    readable `label`."""

    impl: str
    backend: str | None
    configs: dict[str, dict[str, int]]
    label: str


Timer = Callable[[Callable[[], Any], Candidate], float]


def wall_clock(run: Callable[[], Any], candidate: Candidate, repeats: int = 20) -> float:
    """Seconds one `run()` takes: the median of `repeats` timed calls after a first call that
    compiles it, each waited for with `block_until_ready`."""
    del candidate
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernel_impls(platform: str | None = None) -> dict[str, str]:
    """The kernel implementations to tune on `platform` (default: JAX's default backend),
    each with the backend name its launches have in the cache."""
    platform = jax.default_backend() if platform is None else platform
    if platform in ("gpu", "cuda"):
        impls = {"triton": "triton"}
        if _mosaic_gpu.usable() and _mosaic_gpu.target_supported():
            impls["mosaic_gpu"] = "mosaic_gpu"
        return impls
    if platform == "rocm":
        return {"triton": "triton"}
    if platform == "tpu":
        return {"pallas": "mosaic"}
    return {"pallas": "interpret"}


def parse_shape(text: str) -> tuple[int, ...]:
    """`"4096x1024"` -> `(4096, 1024)`: positive sizes joined by `x`, at least two (rows ×
    features, or e.g. batch × channels × height × width)."""
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(
            f"a shape is positive sizes joined by 'x', e.g. 4096x1024 (rows x features) or "
            f"32x128x56x56 (batch x channels x height x width), but got {text!r}."
        )
    return shape


def _spec(op: str) -> Op:
    if op not in OPS:
        raise ValueError(f"the tuner knows the ops {tuple(OPS)}, but got op={op!r}.")
    return OPS[op]


def takes(op: str, shape: tuple[int, ...]) -> bool:
    """Whether `op`'s training step can be built on `shape` (its number of axes)."""
    return len(shape) in _spec(op).axes


def _check_shapes(ops: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> None:
    """`ValueError` for an op of `ops` none of whose `shapes` it [`takes`][]."""
    for op in ops:
        if not any(takes(op, shape) for shape in shapes):
            given = ", ".join("x".join(map(str, s)) for s in shapes)
            raise ValueError(
                f"{op} is tuned on shapes of {_form(op)}, but none of the shapes given has "
                f"them ({given}); add one."
            )


def _form(op: str) -> str:
    """The shapes `op` is tuned on, in words, with an example."""
    spec = _spec(op)
    example = "32x128x56x56" if spec.channels else "8x256x1024" if 3 in spec.axes else "4096x1024"
    return f"{' or '.join(map(str, spec.axes))} axes, e.g. {example}"


def operands(op: str, shape: tuple[int, ...], dtype: Any) -> tuple[jax.Array, ...]:
    """Random operands of a training step of `op` on `shape` in `dtype`: `x` (for the
    channel ops `(batch, channels, spatial)`, the spatial axes flattened), the other operands
    of `OPS[op]`, and the cotangents of the outputs."""
    spec = _spec(op)
    if not takes(op, shape):
        raise ValueError(
            f"{op} is tuned on shapes of {_form(op)}, but got {'x'.join(map(str, shape))}."
        )
    x_shape = (*shape[:2], math.prod(shape[2:])) if spec.channels else shape
    feature = (x_shape[1] if spec.channels else x_shape[-1],)
    shapes = {"residual": x_shape, "z": x_shape, "k": x_shape, "alpha": ()}
    shapes |= {"scale": (x_shape[0], x_shape[-1]), "shift": (x_shape[0], x_shape[-1])}
    keys = iter(jax.random.split(jax.random.key(0), 4 + len(spec.operands)))
    arrays = [jax.random.normal(next(keys), x_shape, dtype)]
    for name in spec.operands:
        arrays.append(jax.random.normal(next(keys), shapes.get(name, feature), dtype))
    cotangents = (jax.random.normal(next(keys), x_shape, dtype) for _ in range(spec.outputs))
    return (*arrays, *cotangents)


def training_step(op: str, impl: str) -> Callable[..., Any]:
    """`(x, *operands, *cotangents) -> gradients` of `op` by `impl`: the forward, and the
    backward to every operand."""
    spec = _spec(op)
    fn = getattr(IMPLEMENTATIONS[impl], op)
    inputs = 1 + len(spec.operands)

    def loss(args, cotangents):
        keywords = {"eps": EPS} if spec.eps else {}
        if op == "group_norm":
            keywords["groups"] = math.gcd(args[0].shape[1], GROUPS)
        out = fn(*args, **keywords)
        out = out if isinstance(out, tuple) else (out,)
        return sum(
            jnp.vdot(o.astype(jnp.float32), c.astype(jnp.float32))
            for o, c in zip(out[: spec.outputs], cotangents, strict=True)
        )

    def step(*args):
        return jax.grad(loss)(args[:inputs], args[inputs:])

    return step


def _time(step: Callable[..., Any], args: tuple, candidate: Candidate, timer: Timer) -> float:
    """`timer`'s seconds for `step` jitted with `candidate`'s pinned configurations, traced
    anew (JAX's caches cleared: they would hold the previous candidate's trace); `inf` when
    it fails to compile or run."""
    jax.clear_caches()
    compiled = jax.jit(step)
    with _tuning.pinned(candidate.configs):
        try:
            return timer(lambda: compiled(*args), candidate)
        except Exception as error:  # a variant may not compile (registers, shared memory)
            print(f"  {candidate.label}: failed ({type(error).__name__}: {error})"[:300])
            return math.inf


def _variants(launches: dict[str, _tuning.Recorded]) -> dict[tuple, dict[str, Any]]:
    """Every scale of `_tuning.variants` allowed for some launch, as the configuration of
    each launch (its default where that scale is not allowed)."""
    per_launch = {
        k: _tuning.variants(r.backend, r.default, r.most_rows, r.fold) for k, r in launches.items()
    }
    scales = list(dict.fromkeys(s for v in per_launch.values() for s in v))
    return {
        scale: {k: v.get(scale, launches[k].default) for k, v in per_launch.items()}
        for scale in scales
    }


def tune_one(
    op: str,
    shape: tuple[int, ...],
    dtype: Any,
    *,
    timer: Timer = wall_clock,
    impls: dict[str, str] | None = None,
) -> dict[str, dict]:
    """The cache entries for `op` on `shape` in `dtype` on this device: for each launch of
    each kernel implementation of `impls` (default [`kernel_impls`][]), its fastest
    configuration and the milliseconds of a training step with it, with the heuristic's and
    with XLA."""
    dtype = jnp.dtype(dtype)
    args = operands(op, shape, dtype)
    xla = _time(
        training_step(op, "reference"), args, Candidate("reference", None, {}, "xla"), timer
    )
    tuned_call = f"{op} {'x'.join(map(str, shape))} {dtype.name}"
    found = {}
    for impl, backend in (kernel_impls() if impls is None else impls).items():
        step = training_step(op, impl)
        jax.clear_caches()
        try:
            with _tuning.recording() as seen:
                jax.eval_shape(step, *args)
        except ValueError as error:  # a pinned backend that cannot run these operands
            print(f"  {impl}: not tuned for {tuned_call} ({error})"[:300])
            continue
        launches = {k: r for k, r in seen.items() if r.backend == backend}
        variants = _variants(launches)
        times = {}
        for scale, configs in variants.items():
            label = f"{impl} rows×{scale[0]} warps×{scale[1]}"
            fields = {k: _tuning.config_fields(c) for k, c in configs.items()}
            times[scale] = _time(step, args, Candidate(impl, backend, fields, label), timer)
        best = min(times, key=times.__getitem__, default=None)
        if best is None or math.isinf(times[best]):
            continue  # no launch of this backend for these operands, or none compiled
        for k, config in variants[best].items():
            found[k] = {
                "config": _tuning.config_fields(config),
                "kernel_ms": times[best] * 1e3,
                "default_ms": times[(1, 1)] * 1e3,
                "xla_ms": xla * 1e3,
                "jax": jax.__version__,
                "tuned": tuned_call,
            }
    return found


def write(found: dict[str, dict], path: os.PathLike | str | None = None) -> pathlib.Path:
    """Merge `found` into the cache file at `path` (default `_tuning.cache_path()`), whose
    other entries are kept when it is readable, and write it atomically."""
    path = pathlib.Path(_tuning.cache_path() if path is None else path)
    if str(path) == "off":
        raise ValueError(
            f"{_tuning.ENV}=off turns the tuning cache off, so there is no file to write; "
            f"pass a path (`--out`) or unset {_tuning.ENV}."
        )
    kept = {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") == _tuning.FORMAT and isinstance(data.get("entries"), dict):
            kept = data["entries"]
    except (OSError, ValueError, AttributeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": _tuning.FORMAT, "entries": kept | found}, indent=1, sort_keys=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text + "\n")
    os.replace(tmp.name, path)
    return path


def tune(
    ops: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[Any],
    *,
    path: os.PathLike | str | None = None,
    timer: Timer = wall_clock,
    impls: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Tune every op × shape × dtype ([`tune_one`][]) and merge the entries into the cache
    file at `path` (default: `$EQXNORM_TUNING_CACHE`, else the user cache directory).

    **Arguments:**

    - `ops`: names from `OPS` (`layer_norm`, `rms_norm`, `add_layer_norm`, …,
      `group_norm`, `batch_norm`).
    - `shapes`: the inputs' shapes: `(rows, features)` for the row norms, `(examples,
      tokens, features)` for adaLN, `(tokens, heads, head_dim)` for QK-norm, `(batch,
      channels, *spatial)` for GroupNorm and BatchNorm. Each op is tuned on the shapes of
      its form ([`takes`][]).
    - `dtypes`: input dtypes (`jnp.bfloat16`, `"float32"`, …).
    - `path`: the cache file to write.
    - `timer`: `timer(run, candidate) -> seconds` (default: the median wall-clock time of 20
      calls); the tests inject a deterministic one.
    - `impls`: `{kernel impl: cache backend name}` to tune (default: those of this device).

    **Returns:**

    The entries written, by cache key.

    **Raises:**

    `ValueError` for an op none of whose `shapes` it takes.
    """
    _check_shapes(ops, shapes)
    found = {}
    for op in ops:
        for shape in [s for s in shapes if takes(op, s)]:
            for dtype in dtypes:
                entries = tune_one(op, shape, dtype, timer=timer, impls=impls)
                write(entries, path)  # each as it is measured: a run cut short keeps them
                found |= entries
    jax.clear_caches()  # what this process traces from now on reads the new entries
    return found


_FIELDS = ("kernel_ms", "default_ms", "xla_ms")


def _complete(e: dict) -> bool:
    """Whether the entry `e` has the times (numbers) and the call the tuner writes."""
    return isinstance(e.get("tuned"), str) and all(
        isinstance(e.get(f), int | float) for f in _FIELDS
    )


def fastest(found: dict[str, dict]) -> dict[str, dict[str, float]]:
    """What each tuned call measured, fastest first: `{call: {name: ms}}` over XLA (`"xla"`)
    and each kernel backend of `found` (its tuned training step), which is what `impl="auto"`
    then runs for the call (the kernels' backend measured faster, `_tuning.faster_backend`,
    unless XLA beat it, `_tuning.prefers_xla`)."""
    times: dict[str, dict[str, float]] = {}
    for k, e in found.items():
        backend = k.split("|")[1]
        call = times.setdefault(e["tuned"], {"xla": e["xla_ms"]})
        call[backend] = max(call.get(backend, 0.0), e["kernel_ms"])
    return {
        # Ties as the dispatch breaks them: the kernels before XLA, Triton before Mosaic GPU.
        call: dict(sorted(ms.items(), key=lambda i: (i[1], i[0] == "xla", i[0] != "triton")))
        for call, ms in times.items()
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eqxnorm.tune", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ops", nargs="+", default=["layer_norm", "rms_norm"], choices=list(OPS))
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["4096x1024"],
        help="ROWSxDIM for the row norms, EXAMPLESxTOKENSxDIM for adaLN, TOKENSxHEADSxHEAD_DIM "
        "for QK-norm, BATCHxCHANNELSxHxW for GroupNorm and BatchNorm; each op is tuned on "
        "the shapes of its form",
    )
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument(
        "--out", default=None, help="the cache file (default: %(default)s → cache dir)"
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--show",
        action="store_true",
        help="tune nothing: print the entries the kernels read on this device (the cache's "
        "and those eqxnorm ships) and what impl='auto' runs for each call measured",
    )
    args = parser.parse_args(argv)
    try:
        shapes = [parse_shape(s) for s in args.shapes]
        _check_shapes(args.ops, shapes)
    except ValueError as error:
        parser.error(str(error))

    def timer(run, candidate):
        return wall_clock(run, candidate, args.repeats)

    if args.show:
        device = _tuning.device_kind()
        found = {k: e for k, e in _tuning.entries().items() if k.startswith(device + "|")}
        _report(found)
        print(
            f"{len(found)} entries for {device} and JAX {jax.__version__} in "
            f"{_tuning.cache_path()} and those eqxnorm ships"
        )
        return
    found = tune(args.ops, shapes, args.dtypes, path=args.out, timer=timer)
    _report(found)
    path = args.out or _tuning.cache_path()
    print(f"wrote {len(found)} entries for {_tuning.device_kind()} to {path}")


def _report(found: dict[str, dict]) -> None:
    """Print each entry of `found`, then what `impl="auto"` runs for each call ([`fastest`][]);
    an entry without the tuner's times (edited by hand) is named as such."""
    complete = {k: e for k, e in found.items() if _complete(e)}
    for k, e in found.items():
        if k not in complete:
            print(f"{k}: an entry without the tuner's times ({', '.join(_FIELDS)}, tuned): {e}")
            continue
        faster = "XLA" if e["xla_ms"] < e["kernel_ms"] else "the kernel"
        print(
            f"{k}: heuristic {e['default_ms']:.4f} ms, tuned {e['kernel_ms']:.4f} ms with "
            f"{e['config']}, XLA {e['xla_ms']:.4f} ms: {faster} is faster ({e['tuned']})"
        )
    # Off a GPU or TPU `impl="auto"` runs the reference whatever was measured.
    runs = "impl='auto' runs" if jax.default_backend() != "cpu" else "fastest:"
    for call, times in fastest(complete).items():
        ranked = ", ".join(f"{name} {ms:.4f} ms" for name, ms in times.items())
        print(f"{call}: {runs} {next(iter(times))} ({ranked})")


if __name__ == "__main__":
    main()
