r"""Differentiation of the fused kernels, above the backends: every order, every mode.

A fused normalization is differentiated like the reference: a `jax.custom_jvp` whose rule
returns the kernel's output and a tangent that is a *linear map* of the input tangents, with
the input and the per-row float32 statistics as residuals (the maths of
`eqxnorm.kernels.reference.normalized`). That linear map is a [`linear`][] call: one JAX
primitive that carries

- `apply(residuals, tangents)`: the tangent map (XLA, the reference's maths), what
  `jax.jvp`, `jax.linearize` and `jax.jacfwd` evaluate;
- `transpose(residuals, cotangents)`: its transpose, the fused backward kernel, what reverse
  mode (`jax.grad`, `jax.vjp`, `jax.jacrev`) runs: linearize, then transpose;
- `reference`: `apply` in differentiable XLA maths, through which JAX differentiates the map
  (and, by transposing it, the backward kernel) with respect to its residuals. So `jax.grad`
  of `jax.grad`, `jax.jvp` of `jax.grad` and `jax.hessian` run the kernels where they can and
  the reference's maths for the derivative of the backward kernel.

A backend plugs in below this: it gives a forward and a backward function; nothing here knows
which kernels run them. JAX's own tools fall short of this on the JAX versions eqxnorm supports
(0.10.2 to 0.12): a `jax.custom_vjp` refuses forward mode; `jax.custom_derivatives.linear_call`
has no batching rule and cannot be differentiated in its residuals (so no second order); and
there is no public `custom_transpose`. The primitive here is `linear_call` with those rules.

**Rules of the primitive.** With residuals $r$, linear inputs $t$ and $A(r)$ the map:

- JVP: $\dot{(A(r)t)} = A(r)\dot{t} + \partial_r(A_\text{ref}(r)t)[\dot{r}]$, the first
  term the primitive again, the second the JVP of `reference`;
- transpose: $A(r)^\top c$, the primitive with `apply` and `transpose` swapped (the
  reference's transpose from `jax.linear_transpose`);
- batching: every function `jax.vmap`ped, so `custom_vmap` folding of the kernels applies;
- lowering: `apply`, traced.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir


@dataclasses.dataclass(frozen=True)
class _Flat:
    """`fn(residuals, linear)` on flat argument lists, returning a flat list. Compared by
    value (the function and the trees), so equal calls give equal primitive parameters and
    `jax.jit` caches hit."""

    fn: Callable
    res_tree: Any
    lin_tree: Any

    def __call__(self, *args):
        n = self.res_tree.num_leaves
        res = jax.tree.unflatten(self.res_tree, args[:n])
        lin = jax.tree.unflatten(self.lin_tree, args[n:])
        return jax.tree.leaves(self.fn(res, lin))


@dataclasses.dataclass(frozen=True)
class _ReferenceTranspose:
    """The transpose of a flat `reference` map, by `jax.linear_transpose`, for linear inputs
    of `lin_avals`."""

    reference: Callable
    num_res: int
    lin_avals: tuple

    def __call__(self, *args):
        res, cts = args[: self.num_res], args[self.num_res :]
        structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in self.lin_avals]
        transposed = jax.linear_transpose(lambda *lin: self.reference(*res, *lin), *structs)
        return list(transposed(list(cts)))


@dataclasses.dataclass(frozen=True)
class _Vmapped:
    """`fn` vmapped over axis 0 of the residuals with `res_batched` and of every linear
    input."""

    fn: Callable
    res_batched: tuple

    def __call__(self, *args):
        n = len(self.res_batched)
        axes = tuple(0 if b else None for b in self.res_batched) + (0,) * (len(args) - n)
        return list(jax.vmap(self.fn, in_axes=axes)(*args))


@dataclasses.dataclass(frozen=True)
class _Map:
    """The functions of one [`linear`][] call, flat."""

    apply: Callable
    transpose: Callable
    reference: Callable
    reference_transpose: Callable
    num_res: int

    def transposed(self) -> "_Map":
        return _Map(
            self.transpose, self.apply, self.reference_transpose, self.reference, self.num_res
        )

    def vmapped(self, res_batched: tuple) -> "_Map":
        fns = (self.apply, self.transpose, self.reference, self.reference_transpose)
        return _Map(*(_Vmapped(f, res_batched) for f in fns), self.num_res)


linear_p = jex_core.Primitive("eqxnorm_linear")
linear_p.multiple_results = True


def linear(
    apply: Callable, transpose: Callable, reference: Callable, residuals: Any, tangents: Any
) -> Any:
    """`apply(residuals, tangents)`, a map linear in `tangents`, whose transpose (reverse mode)
    is `transpose(residuals, cotangents)` and whose derivative in `residuals` is that of
    `reference(residuals, tangents)`, the same map in differentiable JAX (see the module
    docstring). `transpose` returns a pytree like `tangents` (`None` where it is `None`)."""
    res, res_tree = jax.tree.flatten(residuals)
    lin, lin_tree = jax.tree.flatten(tangents)
    out_tree = jax.tree.structure(jax.eval_shape(reference, residuals, tangents))
    lin_avals = tuple(jax.typeof(t) for t in lin)
    reference_flat = _Flat(reference, res_tree, lin_tree)
    fns = _Map(
        _Flat(apply, res_tree, lin_tree),
        _Flat(transpose, res_tree, out_tree),
        reference_flat,
        _ReferenceTranspose(reference_flat, len(res), lin_avals),
        len(res),
    )
    return jax.tree.unflatten(out_tree, linear_p.bind(*res, *lin, fns=fns))


def _abstract_eval(*avals, fns: _Map):
    return jax.make_jaxpr(fns.reference)(*avals).out_avals


def _impl(*args, fns: _Map):
    return fns.apply(*args)


def _jvp(primals, tangents, *, fns: _Map):
    out = linear_p.bind(*primals, fns=fns)
    res, lin = primals[: fns.num_res], primals[fns.num_res :]
    t_res, t_lin = tangents[: fns.num_res], tangents[fns.num_res :]
    terms = []
    if any(type(t) is not ad.Zero for t in t_lin):
        terms.append(linear_p.bind(*res, *map(ad.instantiate_zeros, t_lin), fns=fns))
    if any(type(t) is not ad.Zero for t in t_res):
        t_res = [ad.instantiate_zeros(t) for t in t_res]
        _, t = jax.jvp(lambda *r: fns.reference(*r, *lin), tuple(res), tuple(t_res))
        terms.append(t)
    if not terms:
        return out, [ad.Zero(jax.typeof(o).to_tangent_aval()) for o in out]
    return out, [sum(ts[1:], ts[0]) for ts in zip(*terms)]


def _transpose(cts, *args, fns: _Map):
    res, lin = args[: fns.num_res], args[fns.num_res :]
    if any(ad.is_undefined_primal(r) for r in res):
        raise NotImplementedError("eqxnorm_linear is not linear in its residuals.")
    cts = [ad.instantiate_zeros(c) for c in cts]
    lin_cts = linear_p.bind(*res, *cts, fns=fns.transposed())
    return [None] * len(res) + [c if ad.is_undefined_primal(a) else None for c, a in zip(lin_cts, lin)]


def _batch(args, dims, *, fns: _Map):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    res_batched = tuple(d is not None for d in dims[: fns.num_res])
    moved = []
    for i, (a, d) in enumerate(zip(args, dims)):
        if d is None:
            moved.append(a if i < fns.num_res else jax.numpy.broadcast_to(a, (size, *a.shape)))
        else:
            moved.append(jax.numpy.moveaxis(a, d, 0))
    out = linear_p.bind(*moved, fns=fns.vmapped(res_batched))
    return out, [0] * len(out)


linear_p.def_impl(_impl)
linear_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[linear_p] = _jvp
ad.primitive_transposes[linear_p] = _transpose
batching.primitive_batchers[linear_p] = _batch
mlir.register_lowering(linear_p, mlir.lower_fun(_impl, multiple_results=True))
