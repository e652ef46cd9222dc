"""Trace-time validation shared by every public function and module.

Two layers of checking run on every call, both at trace time only (a jitted steady state
pays nothing):

1. A *precheck* written by hand for each entry point. It turns the mistakes people actually
   make (a batch axis left in, a width that does not match the parameters, an integer array)
   into a `ValueError`/`TypeError` whose message is a complete sentence naming both values and
   the fix.
2. The jaxtyping annotations, enforced by beartype. They are the written contract of every
   signature and the backstop for anything the precheck does not cover.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jaxtyping import Array, jaxtyped

_F = TypeVar("_F", bound=Callable[..., Any])

# What public entry points accept as an array: JAX arrays and NumPy arrays (Equinox modules
# may hold NumPy parameters; `jax.test_util.check_grads` perturbs with them). Use as
# `Float[AnyArray, "..."]`; convert with `jnp.asarray` before computing.
AnyArray = Array | np.ndarray


def typechecked(precheck: Callable[..., None] | None = None) -> Callable[[_F], _F]:
    """Decorate a public function or `__call__`: run `precheck(*args, **kwargs)` (which raises
    the friendly errors), then the jaxtyping+beartype check of the annotations, then the body.
    """

    def decorator(fn: _F) -> _F:
        checked = jaxtyped(typechecker=beartype)(fn)
        if precheck is None:
            return checked

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            precheck(*args, **kwargs)
            return checked(*args, **kwargs)

        return wrapper  # pyright: ignore

    return decorator


def named_scope(name: str) -> Callable[[_F], _F]:
    """Run the decorated call under `jax.named_scope(name)`, so profiles show who is who."""

    def decorator(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with jax.named_scope(name):
                return fn(*args, **kwargs)

        return wrapper  # pyright: ignore

    return decorator


def check_floating(x: Any, name: str, where: str) -> None:
    """`TypeError` unless `x` is a real floating-point JAX/NumPy array."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(
            f"{where}: `{name}` must be a JAX array, but got an object of type "
            f"{type(x).__name__}. Convert it first, e.g. `jnp.asarray({name})`."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{where}: `{name}` must have a floating-point dtype (float16, bfloat16, float32 "
            f"or float64), but it has dtype {dtype}. Normalization of integer, boolean or "
            f"complex data is not defined; cast it first, e.g. `{name}.astype(jnp.float32)`."
        )


# What `eps` may be: any real number that is not a bool (Python or NumPy; a user's `eps=1`
# is as good as `eps=1.0`). Entry points convert it with `float(eps)`.
Number = float | int | np.floating | np.integer


def check_eps(eps: Any, where: str, x: Any = None) -> None:
    """`TypeError`/`ValueError` unless `eps` is a finite real number > 0 and, given the input
    `x`, at least the smallest normal number of the dtype its statistics are computed in
    (a smaller one is flushed to 0 there, and a constant slice would give NaN)."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.number)):
        raise TypeError(
            f"{where}: `eps` must be a real number, but got {eps!r} of type "
            f"{type(eps).__name__}. Pass e.g. `eps=1e-5`."
        )
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(
            f"{where}: `eps` must be a finite number greater than 0 (it keeps 1/sqrt(var + eps) "
            f"finite for constant inputs), but got eps={eps!r}. Pass e.g. `eps=1e-5`."
        )
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return
    stats = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
    tiny = float(jnp.finfo(stats).tiny)
    if eps < tiny:
        raise ValueError(
            f"{where}: eps={eps!r} is not positive in {jnp.dtype(stats).name}, the dtype the "
            f"statistics of a {jnp.dtype(dtype).name} input are computed in: it is below the "
            f"smallest normal {jnp.dtype(stats).name}, {tiny!r}, and is flushed to 0, so a "
            f"constant slice would give NaN. Pass eps >= {tiny!r}, e.g. `eps=1e-5`."
        )


def check_positive_int(value: Any, name: str, where: str) -> None:
    """`TypeError`/`ValueError` unless `value` is a Python int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{where}: `{name}` must be a Python int, but got {value!r} of type "
            f"{type(value).__name__}."
        )
    if value < 1:
        raise ValueError(f"{where}: `{name}` must be at least 1, but got {name}={value}.")


def normalize_shape(shape: Any, where: str) -> tuple[int, ...]:
    """Turn an `int | Sequence[int]` shape argument into a tuple, rejecting empty axes."""
    if isinstance(shape, bool):
        raise TypeError(f"{where}: `shape` must be an int or a sequence of ints, not a bool.")
    if isinstance(shape, int):
        shape = (shape,)
    elif isinstance(shape, Sequence) and all(
        isinstance(s, int) and not isinstance(s, bool) for s in shape
    ):
        shape = tuple(shape)
    else:
        raise TypeError(
            f"{where}: `shape` must be an int or a sequence of ints, but got {shape!r}."
        )
    if any(s < 1 for s in shape):
        raise ValueError(
            f"{where}: every axis of `shape` must have at least one element (statistics over "
            f"an empty axis are undefined), but got shape={shape}."
        )
    return shape


def _describe(shape: tuple[int, ...], names: Sequence[str]) -> str:
    return "(" + ", ".join(f"{n}={s}" for n, s in zip(names, shape, strict=True)) + ")"


def check_example_shape(
    x: Any, expected: tuple[int, ...], where: str, axis_names: Sequence[str]
) -> None:
    """`ValueError` unless a single example `x` has exactly the `expected` shape.

    `axis_names[i]` names `expected[i]` in the message. When `x` carries extra leading axes in
    front of the expected shape, the message says to `jax.vmap` the layer over them.
    """
    if x.shape == expected:
        return
    n = len(expected)
    if x.ndim > n and tuple(x.shape[x.ndim - n :]) == expected:
        extra = x.shape[: x.ndim - n]
        raise ValueError(
            f"{where} normalizes a single example of shape {_describe(expected, axis_names)}, "
            f"but got x.shape={x.shape}: {len(extra)} extra leading axis/axes of size "
            f"{extra}. Equinox layers take one example at a time; for a batch, replace "
            f"`norm(x)` with `jax.vmap(norm)(x)`."
        )
    if x.ndim != n:
        raise ValueError(
            f"{where} expects x of rank {n} with shape {_describe(expected, axis_names)}, "
            f"but got x of rank {x.ndim} with shape {x.shape}. Construct the layer with the "
            f"shape of one example (here `shape={tuple(x.shape)}`), or reshape x to "
            f"{expected} if that is its layout."
        )
    bad = [i for i in range(n) if x.shape[i] != expected[i]]
    details = "; ".join(
        f"axis {i} ({axis_names[i]}) has size {x.shape[i]} but {expected[i]} is expected"
        for i in bad
    )
    raise ValueError(
        f"{where} expects x of shape {_describe(expected, axis_names)}, but got "
        f"x.shape={x.shape}: {details}. Construct the layer with the sizes of your data."
    )


def check_param(
    param: Any, expected: tuple[int, ...], name: str, where: str, description: str
) -> None:
    """`ValueError` unless an optional affine parameter is `None` or has shape `expected`."""
    if param is None:
        return
    check_floating(param, name, where)
    if tuple(param.shape) != expected:
        raise ValueError(
            f"{where}: `{name}` must have shape {expected} ({description}), but got "
            f"{name}.shape={tuple(param.shape)}."
        )


def axis_size(axis_name: Any, where: str) -> int:
    """The number of members of a named axis (or the product over a sequence of names).

    Raises a `ValueError` naming the axis when it is not bound by an enclosing `jax.vmap`,
    `jax.pmap` or `shard_map`.
    """
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    size = 1
    for name in names:
        try:
            size *= jax.lax.axis_size(name)
        except NameError:
            raise ValueError(
                f"{where}: the statistics are pooled over the named axis {name!r}, but no "
                f"enclosing transformation binds it. Call the layer inside "
                f"`jax.vmap(..., axis_name={name!r})` (or `jax.pmap`/`shard_map` with that "
                f"axis name), or pass the name your batch axis actually has."
            ) from None
    return size


def check_mask(mask: Any, x: Any, where: str) -> None:
    """`TypeError`/`ValueError` unless `mask` is `None` or a boolean array that broadcasts to
    `x.shape` (a padding mask: `True` where an element counts in the statistics)."""
    if mask is None:
        return
    dtype = getattr(mask, "dtype", None)
    if dtype is None or jnp.dtype(dtype) != jnp.bool_:
        got = f"mask.dtype={dtype}" if dtype is not None else f"a {type(mask).__name__}"
        raise TypeError(
            f"{where}: `mask` must be a boolean array (True where an element counts in the "
            f"statistics), but got {got}. Pass e.g. `mask=tokens != pad_id`, or "
            f"`mask.astype(bool)`."
        )
    shape = tuple(x.shape)
    try:
        broadcast = jnp.broadcast_shapes(tuple(mask.shape), shape)
    except ValueError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"{where}: `mask` must broadcast to x.shape={shape}, but got "
            f"mask.shape={tuple(mask.shape)}. Give it x's rank, with size 1 on the axes it "
            f"does not vary along (e.g. mask[..., None] to mask whole positions)."
        )


def check_lengths(lengths: Any, mask: Any, expected: tuple[int, ...], where: str) -> None:
    """`TypeError`/`ValueError` unless `lengths` is `None` or an integer array of shape
    `expected` (one valid length per slice), and not given together with `mask`."""
    if lengths is None:
        return
    if mask is not None:
        raise ValueError(
            f"{where}: pass `mask=` or `lengths=`, not both (lengths is the shorthand for "
            f"the mask of each slice's first `lengths` elements)."
        )
    dtype = getattr(lengths, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        got = f"lengths.dtype={dtype}" if dtype is not None else f"a {type(lengths).__name__}"
        raise TypeError(
            f"{where}: `lengths` must be an integer array, but got {got}. Pass e.g. "
            f"`lengths=jnp.asarray(lengths, jnp.int32)`."
        )
    if tuple(lengths.shape) != tuple(expected):
        raise ValueError(
            f"{where}: `lengths` must have shape {tuple(expected)} (one length per slice "
            f"normalized), but got lengths.shape={tuple(lengths.shape)}."
        )
