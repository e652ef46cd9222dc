r"""Differentiation of the fused kernels, above the backends: every order, every mode.

A fused normalization is differentiated like the reference, whose tangent map
(`eqxnorm.kernels.reference.normalized`'s) is the one statement of the derivative maths:

1. [`with_jvp`][]: the forward kernel's call `(x, weight, bias) -> (y, *statistics)` with a
   JVP rule, as one JAX primitive. The rule's primal is the kernel again, so a derivative of
   any order evaluates its values with the kernel.
2. Its rule's tangent of `y` is a [`linear`][] call, a second primitive that carries
   - `apply(residuals, tangents)`: the tangent map in XLA (the reference's maths), what
     `jax.jvp`, `jax.linearize` and `jax.jacfwd` evaluate;
   - `transpose(residuals, cotangents, like)`: its transpose, the fused backward kernel,
     what reverse mode (`jax.grad`, `jax.vjp`, `jax.jacrev`: linearize, then transpose) runs;
   - `reference`: `apply` in differentiable XLA, through which JAX differentiates the map
     (and, transposed, the backward kernel) in its residuals: `jax.grad` of `jax.grad`,
     `jax.jvp` of `jax.grad` and `jax.hessian` run the kernels where they can and the
     reference's maths for the derivative of the backward kernel.

   The residuals are `x`, the parameters and the per-row float32 statistics, so they are
   all first-order reverse mode keeps.
3. The statistics' tangents are the reference's (XLA; unused at first order, so removed).

A backend plugs in below: it gives the forward and backward functions, and nothing here knows
which kernels run them. JAX's own tools fall short of this on the versions eqxnorm supports
(0.10.2 to 0.12): a `jax.custom_vjp` refuses forward mode; `jax.custom_derivatives.linear_call`
has no batching rule and cannot be differentiated in its residuals (no second order); there is
no public `custom_transpose`; and a `jax.custom_jvp` is inlined by the partial evaluation
`lax.scan` runs to hoist loop invariants (it assumes the result is linear), after which a
kernel cannot be differentiated. Each primitive carries its function traced as a jaxpr, so
JAX sees the kernels inside (their `custom_partitioning` needs the devices when lowered) and
lowers it.

**Rules of the linear primitive.** With residuals $r$, linear inputs $t$ and $A(r)$ the map:

- JVP: $\dot{(A(r)t)} = A(r)\dot{t} + \partial_r(A_\text{ref}(r)t)[\dot{r}]$, the first
  term the primitive again, the second the JVP of `reference`;
- transpose: $A(r)^\top c$, the primitive with `apply` and `transpose` swapped (the
  reference's transpose by `jax.linear_transpose`); symbolic-zero cotangents are not
  operands (`transpose` gets `None`), and the result is cast to the linear inputs' dtypes;
- batching: every function `jax.vmap`ped (so the kernels' `custom_vmap` folding applies),
  the gradients of unbatched linear inputs (shared parameters) summed in float32.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from . import reference


@dataclasses.dataclass(frozen=True)
class _Flat:
    """`fn(residuals, linear, *extra)` on flat argument lists, returning a flat list. Compared
    by value (the function, the trees and `extra`), so equal calls give equal primitive
    parameters and `jax.jit` caches hit."""

    fn: Callable
    res_tree: Any
    lin_tree: Any
    extra: tuple = ()

    def __call__(self, *args):
        n = self.res_tree.num_leaves
        res = jax.tree.unflatten(self.res_tree, args[:n])
        lin = jax.tree.unflatten(self.lin_tree, args[n:])
        return jax.tree.leaves(self.fn(res, lin, *self.extra))


@dataclasses.dataclass(frozen=True)
class _ReferenceTranspose:
    """The transpose of a flat `reference` map, by `jax.linear_transpose`, for linear inputs
    of `lin_avals`."""

    reference: Callable
    num_res: int
    lin_avals: tuple

    def __call__(self, *args):
        res, cts = args[: self.num_res], args[self.num_res :]
        # The avals themselves, shardings included (a batch split over an explicit mesh).
        transposed = jax.linear_transpose(lambda *lin: self.reference(*res, *lin), *self.lin_avals)
        return list(transposed(list(cts)))


@dataclasses.dataclass(frozen=True)
class _Vmapped:
    """`fn(*residuals, *linear)` vmapped over axis 0 of the residuals where `res_batched`
    and of the linear inputs where `lin_batched` (`None`: every one), each output along
    axis 0 or, where `summed`, summed over it in at least float32: the gradient of a linear
    input the examples share (a parameter's), accumulated like the reference's."""

    fn: Callable
    res_batched: tuple
    lin_batched: tuple | None = None
    summed: tuple | None = None

    def __call__(self, *args):
        n = len(self.res_batched)
        lin_batched = self.lin_batched or (True,) * (len(args) - n)
        axes = tuple(0 if b else None for b in self.res_batched + lin_batched)
        outs = list(jax.vmap(self.fn, in_axes=axes)(*args))
        if self.summed is None:
            return outs
        return [
            jnp.sum(o.astype(jnp.promote_types(o.dtype, jnp.float32)), axis=0) if s else o
            for o, s in zip(outs, self.summed, strict=True)
        ]


@dataclasses.dataclass(frozen=True)
class _Sparse:
    """`fn` given only the linear inputs that are not symbolic zeros (`zero_avals` holds the
    aval of each one that is, else `None`): each zero is `None`, or zeros when `fill`."""

    fn: Callable
    num_res: int
    zero_avals: tuple
    fill: bool

    def __call__(self, *args):
        given = iter(args[self.num_res :])
        lin = [
            next(given) if a is None else jnp.zeros(a.shape, a.dtype) if self.fill else None
            for a in self.zero_avals
        ]
        return self.fn(*args[: self.num_res], *lin)


@dataclasses.dataclass(frozen=True)
class _Select:
    """`fn`'s outputs where `zero_avals` is `None`."""

    fn: Callable
    zero_avals: tuple

    def __call__(self, *args):
        return [o for o, a in zip(self.fn(*args), self.zero_avals, strict=True) if a is None]


@dataclasses.dataclass(frozen=True)
class _Map:
    """The functions of one [`linear`][] call, flat."""

    apply: Callable
    transpose: Callable
    reference: Callable
    reference_transpose: Callable
    num_res: int

    def transposed(self, zero_avals: tuple) -> "_Map":
        """The map of the transpose, for cotangents that are symbolic zeros where
        `zero_avals` holds their aval (else `None`): those are not operands (a `None` to
        `transpose`, zeros to the reference), and not outputs of its transpose."""
        if all(a is None for a in zero_avals):
            fns = (self.transpose, self.apply, self.reference_transpose, self.reference)
            return _Map(*fns, self.num_res)
        return _Map(
            _Sparse(self.transpose, self.num_res, zero_avals, fill=False),
            _Select(self.apply, zero_avals),
            _Sparse(self.reference_transpose, self.num_res, zero_avals, fill=True),
            _Select(self.reference, zero_avals),
            self.num_res,
        )

    def vmapped(self, res_batched: tuple, lin_batched: tuple) -> "_Map":
        """The map `jax.vmap`ped: its transpose sums the gradients of the unbatched linear
        inputs over the examples (it may return them in a wider dtype; the transpose rule
        casts)."""
        summed = tuple(not b for b in lin_batched)
        forward = functools.partial(_Vmapped, res_batched=res_batched, lin_batched=lin_batched)
        backward = functools.partial(_Vmapped, res_batched=res_batched, summed=summed)
        return _Map(
            forward(self.apply),
            backward(self.transpose),
            forward(self.reference),
            backward(self.reference_transpose),
            self.num_res,
        )


linear_p = jex_core.Primitive("eqxnorm_linear")
linear_p.multiple_results = True


def linear(
    apply: Callable, transpose: Callable, reference: Callable, residuals: Any, tangents: Any
) -> Any:
    """`apply(residuals, tangents)`, a map linear in `tangents`, whose transpose (reverse mode)
    is `transpose(residuals, cotangents, like)` and whose derivative in `residuals` is that
    of `reference(residuals, tangents)`, the same map in differentiable JAX (see the module
    docstring). `like` is `tangents` as `jax.ShapeDtypeStruct`s: `transpose` returns a pytree
    of that structure and those shapes and dtypes (`None` stays `None`)."""
    res, res_tree = jax.tree.flatten(residuals)
    lin, lin_tree = jax.tree.flatten(tangents)
    out_tree = jax.tree.structure(jax.eval_shape(reference, residuals, tangents))
    lin_avals = tuple(jax.typeof(t) for t in lin)
    reference_flat = _Flat(reference, res_tree, lin_tree)
    fns = _Map(
        _Flat(apply, res_tree, lin_tree),
        _Flat(transpose, res_tree, out_tree, (jax.tree.map(_struct, tangents),)),
        reference_flat,
        _ReferenceTranspose(reference_flat, len(res), lin_avals),
        len(res),
    )
    return jax.tree.unflatten(out_tree, _bind_linear(fns, *res, *lin))


def _struct(a) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


def _traced(fn: Callable, args) -> Any:
    """`fn` traced for `args`' types: a primitive's parameter, so that JAX sees the kernels
    in it (a `custom_partitioning` call needs the devices when lowered) and lowers it."""
    return jax.make_jaxpr(fn)(*(jax.typeof(a) for a in args))


def _bind_linear(fns: _Map, *args):
    return linear_p.bind(*args, fns=fns, jaxpr=_traced(fns.apply, args))


def _abstract_eval(*avals, jaxpr, **_):
    # The traced call's effects are the primitive's: the kernels' own have none, Mosaic GPU's
    # interpreter (kernels pinned to it, on CPU) has ordered IO effects, whose tokens
    # `mlir.lower_fun` threads through the lowering.
    return jaxpr.out_avals, jaxpr.effects


def _impl(*args, jaxpr, **_):
    return jex_core.jaxpr_as_fun(jaxpr)(*args)


def _jvp(primals, tangents, *, fns: _Map, jaxpr):
    out = _bind_linear(fns, *primals)
    res, lin = primals[: fns.num_res], primals[fns.num_res :]
    t_res, t_lin = tangents[: fns.num_res], tangents[fns.num_res :]
    terms = []
    if any(type(t) is not ad.Zero for t in t_lin):
        terms.append(_bind_linear(fns, *res, *map(ad.instantiate_zeros, t_lin)))
    if any(type(t) is not ad.Zero for t in t_res):
        t_res = [ad.instantiate_zeros(t) for t in t_res]
        _, t = jax.jvp(lambda *r: fns.reference(*r, *lin), tuple(res), tuple(t_res))
        terms.append([ti.astype(o.dtype) for ti, o in zip(t, out, strict=True)])
    if not terms:
        return out, [ad.Zero(jax.typeof(o).to_tangent_aval()) for o in out]
    return out, [sum(ts[1:], ts[0]) for ts in zip(*terms, strict=True)]


def _transpose(cts, *args, fns: _Map, jaxpr):
    res, lin = args[: fns.num_res], args[fns.num_res :]
    if any(ad.is_undefined_primal(r) for r in res):
        raise NotImplementedError(
            "eqxnorm's linear map (eqxnorm_linear) was transposed with respect to its "
            "residuals, in which it is not linear: this is a bug in eqxnorm; please report it "
            "with the transformation that raised it."
        )
    zero_avals = tuple(c.aval if type(c) is ad.Zero else None for c in cts)
    if all(a is not None for a in zero_avals):
        return [None] * len(args)
    given = [c for c in cts if type(c) is not ad.Zero]
    lin_cts = _bind_linear(fns.transposed(zero_avals), *res, *given)
    return [None] * len(res) + [
        c.astype(a.aval.dtype) if ad.is_undefined_primal(a) else None
        for c, a in zip(lin_cts, lin, strict=True)
    ]


def _batch(args, dims, *, fns: _Map, jaxpr):
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims, strict=True)]
    batched = tuple(d is not None for d in dims)
    vmapped = fns.vmapped(batched[: fns.num_res], batched[fns.num_res :])
    out = _bind_linear(vmapped, *moved)
    return out, [0] * len(out)


linear_p.def_impl(_impl)
linear_p.def_effectful_abstract_eval(_abstract_eval)
ad.primitive_jvps[linear_p] = _jvp
ad.primitive_transposes[linear_p] = _transpose
batching.primitive_batchers[linear_p] = _batch
mlir.register_lowering(linear_p, mlir.lower_fun(_impl, multiple_results=True))


# --- kernels with a JVP rule ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FlatCall:
    """`fn(*args)` on flat arguments, returning a flat list."""

    fn: Callable
    in_tree: Any

    def __call__(self, *args):
        return jax.tree.leaves(self.fn(*jax.tree.unflatten(self.in_tree, args)))


@dataclasses.dataclass(frozen=True)
class _FlatJvp:
    """`jvp(primals, tangents)` on flat lists (`None` for a zero tangent), returning the flat
    outputs followed by their flat tangents."""

    jvp: Callable
    in_tree: Any

    def __call__(self, primals, tangents):
        unflat = (jax.tree.unflatten(self.in_tree, a) for a in (primals, tangents))
        out, t_out = self.jvp(*(tuple(a) for a in unflat))
        return jax.tree.leaves(out) + jax.tree.leaves(t_out)


@dataclasses.dataclass(frozen=True)
class _VmappedCall:
    """`fn` vmapped with `in_axes`, every output along axis 0."""

    fn: Callable
    in_axes: tuple

    def __call__(self, *args):
        return list(jax.vmap(self.fn, in_axes=self.in_axes)(*args))


@dataclasses.dataclass(frozen=True)
class _VmappedJvp:
    """A flat JVP rule vmapped over axes `in_axes` of the primals and of their tangents."""

    jvp: Callable
    in_axes: tuple

    def __call__(self, primals, tangents):
        axes = (
            list(self.in_axes),
            [a if t is not None else None for a, t in zip(self.in_axes, tangents, strict=True)],
        )
        return list(jax.vmap(self.jvp, in_axes=axes)(list(primals), list(tangents)))


kernel_p = jex_core.Primitive("eqxnorm_kernel")
kernel_p.multiple_results = True


def with_jvp(fn: Callable, jvp: Callable) -> Callable:
    """`fn` (a kernel call, arrays or `None` in, a pytree of arrays out) with the JVP rule
    `jvp(primals, tangents) -> (outputs, output tangents)`, `None` for each zero tangent in.

    A `jax.custom_jvp` would do, but JAX inlines a custom JVP function whose inputs are
    partly unknown to a partial evaluation (as `lax.scan` does to hoist what does not
    change across iterations), which a kernel does not survive: this is one primitive
    instead, evaluated by `fn`, differentiated by `jvp`, batched by `jax.vmap` of both.
    `fn` and `jvp` should be the same objects at every call (`jax.jit` caches on them)."""

    def call(*args):
        flat, in_tree = jax.tree.flatten(args)
        out_tree = jax.tree.structure(jax.eval_shape(fn, *args))
        outs = _bind_kernel(_FlatCall(fn, in_tree), _FlatJvp(jvp, in_tree), *flat)
        return jax.tree.unflatten(out_tree, outs)

    return call


def _bind_kernel(fn: Callable, jvp: Callable, *args):
    return kernel_p.bind(*args, fn=fn, jvp=jvp, jaxpr=_traced(fn, args))


def _kernel_jvp(primals, tangents, *, fn, jvp, jaxpr):
    tangents = [None if type(t) is ad.Zero else t for t in tangents]
    outs = jvp(list(primals), tangents)
    return outs[: len(outs) // 2], outs[len(outs) // 2 :]


def _kernel_batch(args, dims, *, fn, jvp, jaxpr):
    dims = tuple(dims)
    outs = _bind_kernel(_VmappedCall(fn, dims), _VmappedJvp(jvp, dims), *args)
    return outs, [0] * len(outs)


kernel_p.def_impl(_impl)
kernel_p.def_effectful_abstract_eval(_abstract_eval)
ad.primitive_jvps[kernel_p] = _kernel_jvp
batching.primitive_batchers[kernel_p] = _kernel_batch
mlir.register_lowering(kernel_p, mlir.lower_fun(_impl, multiple_results=True))


# --- the normalizations ------------------------------------------------------------------------


class Layout(NamedTuple):
    """How a kernel family's arrays map onto the reference's view, whose tangent map
    (`eqxnorm.kernels.reference.normalized`'s) is the one statement of the derivative maths.

    - `axis`, `center`: the reduced axes of the view, and whether the mean is subtracted.
    - `x(a)`: the view of `x` or its tangent (and `x`'s shape back from the view's, `unview`).
    - `param(p)`: the view of a parameter (weight, bias or their tangents; `None` stays).
    - `stat(s)`: the view of a per-row statistic, the reduced axes of size 1 (and back,
      `unstat`).
    - `weight_offset`: added to the weight (in float32) where the norm applies it: a kernel
      that takes γ and applies `offset + γ` itself (adaLN's `1 + scale`).
    """

    axis: int | tuple[int, ...]
    center: bool
    x: Callable
    unview: Callable
    param: Callable
    stat: Callable
    unstat: Callable
    weight_offset: float = 0.0


def tangent(layout: Layout, residuals, tangents):
    """`(t_y, t_mean, t_var)` of the reference's tangent map for `residuals = (x, weight,
    shift, offset, rstd)` and `tangents = (tx, tweight, tbias)` (each may be `None`), `t_y`
    in the view's layout, the statistics' in its."""
    x, weight, shift, offset, rstd = residuals
    tx, tw, tb = tangents
    view = (None if a is None else layout.x(a) for a in (x, tx))
    stats = (layout.stat(s) for s in (shift, offset, rstd))
    (vx, vtx), (vs, vo, vr) = view, stats
    params = (layout.param(p) for p in (weight, tw, tb))
    vw, vtw, vtb = params
    vw = reference.offset_weight(vw, layout.weight_offset, jnp.float32)
    return reference._normalized_tangent(
        layout.axis, layout.center, None, vx, vs, vo, vr, vw, vtx, vtw, vtb
    )


def statistics_tangents(layout: Layout, residuals, tangents) -> tuple:
    r"""The tangents of the kernel's `(shift, offset, rstd)` (see [`tangent`][]): the mean's
    on `shift`, and $\dot{r} = -\tfrac{1}{2} r^3 \dot{\sigma}^2$."""
    rstd = residuals[4]
    _, t_mean, t_var = tangent(layout, residuals, tangents)
    t_mean, t_var = layout.unstat(t_mean), layout.unstat(t_var)
    return t_mean, jnp.zeros_like(t_mean), -0.5 * rstd * rstd * rstd * t_var


def norm_map(
    backward: Callable, reduce_param_grads: Callable | None, layout: Layout, out_dtype=None
) -> tuple[Callable, Callable]:
    """`(apply, transpose)` of a fused normalization's [`linear`][] tangent map of `y` (see
    [`norm_with_jvp`][] for `backward` and `reduce_param_grads`), `y`'s tangent in `out_dtype`
    (default `x.dtype`)."""

    def apply(residuals, tangents):
        x = residuals[0]
        t_y = tangent(layout, residuals, tangents)[0]
        return layout.unview(t_y, x.shape).astype(x.dtype if out_dtype is None else out_dtype)

    def transpose(residuals, dy, like):
        x, weight, shift, offset, rstd = residuals
        like_x, *like_params = like
        given = [p for p in like_params if p is not None]
        dtypes = tuple(None if p is None else jnp.dtype(p.dtype) for p in like_params)
        dx, *grads = backward(bool(given), dtypes)(x, weight, dy, shift, offset, rstd)
        if given and reduce_param_grads is not None:
            # Both gradients at once: one XLA launch can reduce the pair.
            grads = reduce_param_grads(grads, given[0])
        # The parameters' gradients stay float32 (summed over the examples in float32 under
        # `vmap`); the transpose rule casts them.
        return None if like_x is None else dx, *(
            None if p is None else g for p, g in zip(like_params, grads, strict=True)
        )

    return apply, transpose


def norm_with_jvp(
    forward: Callable,
    backward: Callable,
    reduce_param_grads: Callable | None,
    layout: Layout,
    out_dtype=None,
) -> Callable:
    """The differentiable function `(x, weight, bias) -> y` of a fused normalization.

    - `forward(x, weight, bias) -> (y, shift, offset, rstd)`: the forward kernel, the
      statistics float32 and per row, `y` in `out_dtype` (default `x.dtype`).
    - `backward(param_grads, param_dtypes)(x, weight, dy, shift, offset, rstd) -> (dx,
      dweight, dbias)`: the backward kernel (`param_dtypes` the parameters' dtypes, `None`
      for one absent), the parameter gradients float32 partial sums (`None` unless
      `param_grads`; a kernel may write final sums in the parameters' dtypes), reduced to
      the parameters' shapes by `reduce_param_grads(grads, like) -> grads` (`grads` both
      gradients, `like` a parameter's struct, for its dtype; `None`: they have the
      parameters' shapes already).

    The kernel's `(y, shift, offset, rstd)` [`with_jvp`][]: `y`'s tangent a [`linear`][] map
    of the reference's maths whose transpose is `backward`, the statistics' the reference's
    (see the module docstring).
    """
    apply, transpose = norm_map(backward, reduce_param_grads, layout, out_dtype)

    def rule(primals, tangents):
        x, weight, bias = primals
        y, shift, offset, rstd = outputs(x, weight, bias)
        residuals = (x, weight, shift, offset, rstd)
        t_y = linear(apply, transpose, apply, residuals, tangents)
        t_stats = statistics_tangents(layout, residuals, tangents)
        return (y, shift, offset, rstd), (t_y, *t_stats)

    outputs = with_jvp(forward, rule)
    return lambda x, weight, bias: outputs(x, weight, bias)[0]


# --- fused ops differentiated through their reference ----------------------------------------


def _filled(primals, tangents) -> tuple:
    """`tangents` with zeros for the `None` ones of array primals (`None` primals stay)."""
    return tuple(
        t if t is not None or p is None else jnp.zeros(p.shape, p.dtype)
        for p, t in zip(primals, tangents, strict=True)
    )


def reference_jvp(reference: Callable, primals: tuple, tangents: tuple):
    """The tangents of `reference(*primals)` (`None` tangents are zeros): the derivative
    maths of a fused op stated once, by its XLA reference."""
    return jax.jvp(reference, tuple(primals), _filled(primals, tangents))[1]


def fused_with_jvp(
    forward: Callable,
    backward: Callable,
    reference: Callable,
    saved_tangents: Callable | None = None,
) -> Callable:
    """The differentiable function `(*primals) -> outputs` of a fused op whose derivative is
    its reference's: [`with_jvp`][] of the forward kernel, whose outputs' tangent is a
    [`linear`][] map evaluated by `jax.jvp` of `reference` and transposed by the backward
    kernel.

    - `forward(*primals) -> (outputs, saved)`: the forward kernel; `saved` (a tuple, may be
      empty) are per-row statistics the backward reads.
    - `backward(primals, saved, cotangents, like) -> gradients`: the backward kernel, one
      gradient per primal (`None` where `like`, the tangents' structs, is `None`);
      `cotangents` has `None` for each output whose cotangent is a symbolic zero.
    - `reference(*primals) -> outputs`: the same maths in differentiable XLA.
    - `saved_tangents(primals, saved, tangents)`: the tangents of `saved` (needed only when
      `saved` is not empty; unused at first order, so removed).

    The residuals are the primals and `saved`, so reverse mode keeps nothing else.
    """

    def apply(residuals, tangents):
        return reference_jvp(reference, residuals[0], tangents)

    def transpose(residuals, cotangents, like):
        primals, saved = residuals
        return tuple(backward(primals, saved, cotangents, like))

    def rule(primals, tangents):
        outs, saved = outputs(*primals)
        residuals = (tuple(primals), saved)
        t_outs = linear(apply, transpose, apply, residuals, tuple(tangents))
        t_saved = saved_tangents(primals, saved, tangents) if saved else ()
        return (outs, saved), (t_outs, t_saved)

    outputs = with_jvp(forward, rule)
    return lambda *primals: outputs(*primals)[0]
