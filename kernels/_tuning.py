r"""The tuning cache: block configurations measured on the user's device, read at trace time.

`python -m eqxnorm.tune` times, for the user's shapes, the kernels with each variant of the
block configuration the one heuristic chooses (`_common.block_config`, `_mosaic_gpu.boxes`)
and the XLA reference, and writes what it found to a JSON file. The kernels read it here:

- **Where.** `$EQXNORM_TUNING_CACHE` when set, else `$XDG_CACHE_HOME/eqxnorm/tuning.json`
  (`~/.cache/eqxnorm/tuning.json` without `XDG_CACHE_HOME`): [`cache_path`][].
  `EQXNORM_TUNING_CACHE=off` turns the cache off (the tests do: their launches are the
  heuristic's).
- **Keys.** `"device kind|backend|op|dtype|rows x width"`: the device's `device_kind` (e.g.
  `NVIDIA H200`), the kernel backend (`triton`, `mosaic_gpu`, `mosaic`, `interpret`), the
  kernel's op (`layer_norm`, `rms_norm`, `add_layer_norm`, …, `group_norm`, `batch_norm`), the
  dtype of its input, and the bucket of the `(rows, width)` the heuristic is asked about: each
  rounded up to a power of two ([`bucket`][]), which is the granularity of the heuristic
  itself (Triton pads both to powers of two), so every shape of a bucket launches alike.
- **Values.** `{"config": {"block_rows": 16, "num_warps": 8, "num_stages": 1}, "kernel_ms",
  "default_ms", "xla_ms", "jax", "tuned"}`: the fields of the tuned configuration, the
  measured milliseconds of a training step with it, with the heuristic's, and with the XLA
  reference, the JAX version measured with, and the call that was measured.
- **Shipped.** eqxnorm carries the tuner's results from the GPUs it was run on
  (`_measured_tuning.json` beside this module, [`SHIPPED`][]: an H200 with JAX 0.12.0.1,
  LayerNorm and RMSNorm in bf16 at 4096 rows of 1024, 8192 and 65536 features). They are
  read beneath the user's file, whose entries win, under the same rules: a user with that
  device and JAX gets those launches measured (LayerNorm's training step at 4096×8192 on 8
  warps a row, not 16: 0.29 ms, was 0.43; XLA at 65536, 1.3× faster than the chunked Triton
  kernels) without tuning; any other falls back to the heuristic.
- **Never failing.** The heuristic asks [`tuned`][] for each launch; it gets the default back
  unless an entry for that launch exists, was measured with the installed JAX (else it is
  stale: the kernels' code generation may have changed), and its configuration is one of the
  [`variants`][] of today's default (else the heuristic has changed since). A file that cannot
  be read or parsed is ignored with one warning.

The op and dtype of a launch come from [`launching`][], which `_common.per_platform` enters
around every kernel call, so the heuristic's signature stays `(target, rows, width)`. The
same hook lets the measured dispatch learn which launches a call makes: `impl="auto"`, whether
XLA was measured faster than the kernels ([`prefers_xla`][]); on a GPU, which kernel backend
was measured faster for the call, Triton or Mosaic GPU ([`faster_backend`][]).
"""

import contextlib
import contextvars
import functools
import json
import math
import os
import pathlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

ENV = "EQXNORM_TUNING_CACHE"
FORMAT = 1
# How each field of a configuration may move from the heuristic's choice: halved, kept,
# doubled. `num_warps` only on Triton (the other backends have no such setting).
SCALES = (0.5, 1, 2)
# The variant of a Mosaic GPU launch over tiles of rows whose kernel also takes folded rows
# (`_mosaic_gpu.boxes`' `fold`): each row folded, one per program (`block_rows` 1). The
# heuristic folds only rows too wide for a tile; whether narrower ones gain (more programs
# per SM, no reduction across warps per box) is for the device to say.
FOLD = ("folded", 1)


class Launch(NamedTuple):
    """What a kernel call being traced is: its `op` and the `dtype` of its input."""

    op: str
    dtype: str


class Recorded(NamedTuple):
    """A launch seen by the heuristic: the heuristic's `default`, its `backend`, the most
    rows a block may have (`most_rows`, `None` when the backend has no extra bound), and
    whether its rows may be folded instead (`fold`, [`FOLD`][])."""

    default: Any
    backend: str
    most_rows: int | None
    fold: bool = False


_LAUNCH: contextvars.ContextVar[Launch | None] = contextvars.ContextVar("launch", default=None)
_RECORDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("record", default=None)
_PINNED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pinned", default=None)


# The tuner's measurements eqxnorm ships (see the module docstring).
SHIPPED = pathlib.Path(__file__).with_name("_measured_tuning.json")


def cache_path() -> pathlib.Path:
    """The tuning cache file: `$EQXNORM_TUNING_CACHE`, else `eqxnorm/tuning.json` in the
    user's cache directory (`$XDG_CACHE_HOME`, default `~/.cache`)."""
    if os.environ.get(ENV):
        return pathlib.Path(os.environ[ENV]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "eqxnorm" / "tuning.json"


def bucket(n: int) -> int:
    """`n` rounded up to a power of two (at least 1)."""
    return 1 << max(n - 1, 0).bit_length()


def key(device: str, backend: str, op: str, dtype: str, rows: int, width: int) -> str:
    """The cache key of a launch (see the module docstring)."""
    return f"{device}|{backend}|{op}|{dtype}|{bucket(rows)}x{bucket(width)}"


def device_kind() -> str:
    """The `device_kind` of JAX's default device (`cpu` on a CPU)."""
    return jax.devices()[0].device_kind


def launch_of(fn: Callable[..., Any], operands: tuple[Any, ...], op: str | None = None) -> Launch:
    """The [`Launch`][] of `fn(target, *operands)`: the op `op`, else the one named by `fn`'s
    `op` keyword (the row norms), else by the module of its kernel family (`group_norm`,
    `batch_norm`), and the dtype of the first operand."""
    op = op or getattr(fn, "keywords", {}).get("op")
    if op is None:
        op = getattr(fn, "func", fn).__module__.rsplit(".", 1)[-1]
    dtype = getattr(operands[0], "dtype", None) if operands else None
    return Launch(op, "none" if dtype is None else jnp.dtype(dtype).name)


@contextlib.contextmanager
def launching(launch: Launch) -> Iterator[None]:
    """Within: the kernel launches traced are `launch`'s."""
    token = _LAUNCH.set(launch)
    try:
        yield
    finally:
        _LAUNCH.reset(token)


@contextlib.contextmanager
def recording() -> Iterator[dict[str, Recorded]]:
    """Within: every launch the heuristic is asked about is recorded, by key, into the dict
    yielded (as a [`Recorded`][], whose `most_rows` is the bound [`tuned`][] applied)."""
    seen: dict[str, Recorded] = {}
    token = _RECORDING.set(seen)
    try:
        yield seen
    finally:
        _RECORDING.reset(token)


@contextlib.contextmanager
def pinned(configs: dict[str, dict[str, int]]) -> Iterator[None]:
    """Within: the launches of `configs`' keys take those fields of their configuration
    (the tuner's candidates, as [`config_fields`][] gives them) ahead of the cache file,
    where they are [`variants`][] of the launch's default."""
    token = _PINNED.set(configs)
    try:
        yield
    finally:
        _PINNED.reset(token)


def variants(
    backend: str, default: Any, most_rows: int | None = None, fold: bool = False
) -> dict[tuple, Any]:
    """The configurations a launch may use instead of the heuristic's `default`, by their
    scale `(rows, warps)`: its `block_rows` (and on Triton its `num_warps`) halved, kept or
    doubled, within what the backend allows and at most `most_rows` rows; with `fold` (a
    Mosaic GPU launch over tiles whose rows may be folded), [`FOLD`][]'s one row. These are
    both the tuner's candidates and the only overrides the cache may give; `(1, 1)`, the
    default, comes first."""
    out = {(1, 1): default}
    if default.block_rows == 0:  # rows that do not fit on chip: nothing to choose
        return out
    if fold and backend == "mosaic_gpu" and default.block_rows > 1:
        out[FOLD] = default._replace(block_rows=1)
    warp_scales = SCALES if backend == "triton" else (1,)
    for rows_scale in SCALES:
        for warp_scale in warp_scales:
            fields = {"block_rows": int(default.block_rows * rows_scale)}
            if warp_scale != 1:
                fields["num_warps"] = int(default.num_warps * warp_scale)
            candidate = default._replace(**fields)
            if candidate not in out.values() and _allowed(backend, default, candidate, most_rows):
                out[rows_scale, warp_scale] = candidate
    return out


def _allowed(backend: str, default: Any, candidate: Any, most_rows: int | None) -> bool:
    """Whether `backend` can launch `candidate`: Mosaic GPU whole tiles of rows, Mosaic TPU
    whole sublane groups within the VMEM asked for, Triton blocks within the elements and
    warps the heuristic allows (or its own choice's elements, if more)."""
    from . import _common as c  # which imports this module

    rows = candidate.block_rows
    if rows < 1 or (most_rows is not None and rows > most_rows):
        return False
    if backend == "mosaic_gpu":
        return rows % default.tile_rows == 0
    if backend == "mosaic":
        need = c.MOSAIC_VMEM_BLOCKS * rows * candidate.row_cols * 4
        return rows % c.MOSAIC_ROW_MULTIPLE == 0 and need <= c.MOSAIC_VMEM_MAX
    elements = max(c.MAX_BLOCK_ELEMENTS, default.block_rows * default.block_cols)
    return (
        rows <= c.MAX_BLOCK_ROWS
        and rows * candidate.block_cols <= elements
        and 1 <= candidate.num_warps <= 16
    )


def config_fields(config: Any) -> dict[str, int]:
    """The fields of `config` the cache stores: those [`variants`][] may change."""
    fields = {"block_rows": config.block_rows}
    if "num_warps" in config._fields:
        fields |= {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return fields


def tuned(
    default: Any,
    backend: str,
    rows: int,
    width: int,
    most_rows: int | None = None,
    fold: bool = False,
) -> Any:
    """The configuration of a launch over `(rows, width)` on `backend` whose heuristic
    choice is `default`: with the fields the tuner pins or the cache's entry gives when they
    make one of `default`'s [`variants`][] (see the module docstring), else `default`. Two
    launches of one key (a forward and a backward staging differently) each check the
    fields against their own default. `most_rows` bounds a block's rows
    (default: the rows rounded up to a power of two, or the heuristic's choice if more);
    Mosaic GPU passes what fits in shared memory, and `fold` where its rows may be folded
    (`block_rows` 1 then asks for them folded, [`FOLD`][])."""
    launch = _LAUNCH.get()
    if launch is None:
        return default
    k = key(device_kind(), backend, launch.op, launch.dtype, rows, width)
    if most_rows is None:  # more rows than the input's, rounded up, would idle
        most_rows = max(bucket(rows), default.block_rows)
    seen = _RECORDING.get()
    if seen is not None:
        seen.setdefault(k, Recorded(default, backend, most_rows, fold))
    pins = _PINNED.get()
    fields = pins.get(k) if pins is not None and k in pins else entries().get(k, {}).get("config")
    if not isinstance(fields, dict):
        return default
    try:
        candidate = default._replace(**fields)
    except (TypeError, ValueError):
        return default
    allowed = variants(backend, default, most_rows, fold).values()
    return candidate if candidate in allowed else default


def entries() -> dict[str, dict]:
    """The valid entries of the cache file over the shipped ones ([`SHIPPED`][]): a key the
    file has is the file's (none when `$EQXNORM_TUNING_CACHE` is `off`; an absent or
    unreadable file adds none)."""
    if os.environ.get(ENV) == "off":
        return {}
    return _read(SHIPPED) | _read(cache_path())


def _read(path: pathlib.Path) -> dict[str, dict]:
    """The valid entries of the cache file at `path` (none when it is absent)."""
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return {}
    return _load(str(path), stamp, jax.__version__)


@functools.lru_cache(maxsize=8)
def _load(path: str, stamp: int, jax_version: str) -> dict[str, dict]:
    try:
        data = json.loads(pathlib.Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        found = data["entries"]
        return {
            k: e
            for k, e in found.items()
            if isinstance(e, dict)
            and isinstance(e.get("config"), dict)
            and e.get("jax") == jax_version
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        warnings.warn(
            f"eqxnorm ignores the tuning cache {path}, which it cannot read ({error}); the "
            f"kernels use their heuristic. Run `python -m eqxnorm.tune` to rewrite it, or "
            f"delete it.",
            stacklevel=2,
        )
        return {}


def _for_this_device() -> dict[str, dict] | None:
    """The cache's entries ([`entries`][]) when some are for this device, else `None`."""
    found = entries()
    device = device_kind()
    return found if any(k.startswith(device + "|") for k in found) else None


def _ms(entry: dict, field: str) -> float:
    """`entry[field]` in milliseconds, `inf` where it is absent or not a number."""
    try:
        return float(entry.get(field, "inf"))
    except (TypeError, ValueError):
        return float("inf")


def prefers_xla(trace: Callable[[], Any]) -> bool:
    """Whether the cache says XLA is faster than the kernels for the call `trace` traces
    (abstractly): every launch it makes that has an entry for this device measured the XLA
    reference faster than the tuned kernel, and at least one has. Without entries for this
    device, `trace` is not run."""
    found = _for_this_device()
    if found is None:
        return False
    with recording() as seen:
        trace()
    measured = [found[k] for k in seen if k in found]
    return bool(measured) and all(_ms(e, "xla_ms") < _ms(e, "kernel_ms") for e in measured)


def faster_backend(traces: dict[str, Callable[[], Any]]) -> str | None:
    """The kernel backend the cache measured fastest on this device for one kernel call:
    `traces` maps each backend that can run it (`"triton"`, `"mosaic_gpu"`) to a function
    tracing the call on that backend abstractly. Each backend's time is the slowest training
    step that measured one of its launches (the tuner times a whole step, so a forward's and
    a backward's launches of one call share an entry, or carry the same time); the fastest
    backend wins, the first of `traces` on a tie. `None`, for the caller's default, unless
    every launch of every backend was measured. Without entries for this device nothing is
    traced."""
    found = _for_this_device()
    if found is None:
        return None
    times = {}
    for backend, trace in traces.items():
        with recording() as seen:
            trace()
        launches = [k for k, r in seen.items() if r.backend == backend]
        if not launches or any(k not in found for k in launches):
            return None
        times[backend] = max(_ms(found[k], "kernel_ms") for k in launches)
    if not times or math.isinf(min(times.values())):
        return None
    return min(times, key=times.__getitem__)
