r"""Running a kernel call on each device's slice of the data when its inputs are sharded.

A `pallas_call` is one opaque custom call to XLA's partitioners: under `jax.jit` with inputs
sharded across devices they replicate it, gathering every input onto every device first.
[`partitioned`][] runs a kernel call on each device's slice instead, followed by the
collectives its outputs need, from a [`Rule`][] that says how the call's operands and outputs
relate:

```python
Rule("g r d, g d, g r d -> g r d, g d", split="g r")
```

names the axes of each operand and output (one entry per position, `None` operands and
outputs included; an entry may be empty for a scalar) with *factors*. The `split` factors are
those along which the call is independent (rows, examples): it may run on any block of them.
Every other factor (the features a statistic reduces over) is gathered whole onto each device.
An output without a split factor `r` that the operands have is either a sum over it (a
parameter's gradient over the rows: each device's value is `psum`med over the mesh axes
splitting `r`, unless the rule's `combine` says otherwise; the BatchNorm moments combine
partial statistics with Chan's formula) or independent of it (the same on every device along
`r`: nothing to add). The output's entry says which with a mark after its axes, `+r` (a sum)
or `~r` (independent):

```python
Rule("q d, k d -> q d ~k, k d ~q", split="q k")  # two independent outputs
Rule("q d, k d -> q d +k", split="q k")  # out[q, d] = sum over k of a term of q[q], k[k]
```

Unmarked, the output is a sum over `r` when some operand has `r` together with every split
factor the output keeps (`g d` from `g r d`, or an output with no split factor at all: the
parameter gradients); any other unmarked case is ambiguous (added up, two independent
outputs would be multiplied by the shard count) and the call raises a `ValueError` asking
for the mark. Which mesh axes split which factor is read from the operands' shardings; a
factor whose size the shard count does not divide is not split.

**How.** Three cases, decided when the call is traced:

- **Explicit meshes** (`jax.sharding.AxisType.Explicit`, the default of `jax.make_mesh` in
  JAX 0.10): the shardings are in the operands' types (`jax.typeof(x).sharding`), so the call
  becomes a `jax.shard_map`, the operands first `reshard`ed to be split along the split
  factors only (`pallas_call` refuses operands with sharded types anyway). It is manual over
  every mesh axis, as the Pallas interpreter fails where any axis is left explicit. The
  outputs are then `reshard`ed back to the shardings their factors had in the operands: a
  `custom_vjp` wants each cotangent typed like its primal.
- **Auto meshes** (shardings propagated by the compiler; JAX 0.10 partitions with Shardy): the
  shardings exist only when XLA partitions the program, so the call becomes a
  `jax.experimental.custom_partitioning` op. Its Shardy sharding rule (which Shardy
  requires) is the [`Rule`][], the non-split factors marked as needing replication; its
  `partition` callback lowers the call on the local shapes followed by the collectives. The
  call's constants (NumPy arrays in a traced kernel wrapper, which `custom_partitioning`
  refuses) become replicated operands.
- Inside `shard_map`/`pmap`, or on one device, `custom_partitioning` lowers the call as it is:
  the data is already local.
- Under an abstract mesh with no devices behind it (`jax.sharding.use_abstract_mesh`, as JAX
  0.11+ asks for lowering to a GPU from a CPU machine), the call runs as it is:
  `custom_partitioning` needs devices, and JAX refuses it there.

`custom_partitioning` has no batching rule, so [`partitioned`][] returns a `custom_vmap`
function: under `jax.vmap` it partitions the vmapped call, with the vmapped axis one more split
factor (a vmapped call is independent along it). Neither has a differentiation rule: wrap the
calls inside a `custom_vjp`'s forward and backward.

**Not partitioned** (still correct, with the operands gathered as before): a factor whose
size the shard count does not divide, shardings without a mesh (`GSPMDSharding`), and TPU as
the default backend with an Auto mesh, where `custom_partitioning` is reported not to compile
(jax-ml/jax#38196; use an explicit mesh or `shard_map` there). A sharded program exported with
`jax.export` fails: `custom_partitioning` lowers through Python callbacks, which are not
serializable.

**Not handled**: inside `shard_map` with `check_vma=True` (its default), `pallas_call` itself
raises (its outputs carry no varying-axes types in JAX 0.10, and its interpreter fails on
them): pass `check_vma=False`.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import (
    ArrayMapping,
    SdyShardingRule,
    custom_partitioning,
)
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

# `combine(outputs, axis_name) -> outputs`: the global outputs (a tuple, `None` for absent
# ones) from one device's, by collectives over `axis_name`, the mesh axes splitting the
# factors that the outputs lack.
Combine = Callable[[tuple, tuple], tuple]


class Rule(NamedTuple):
    """How a kernel call's operands and outputs relate (see the module docstring).

    - `spec`: `"operand factors, ... -> output factors, ..."`, one entry per position. A
        factor written `b?` is optional: an operand with fewer axes than its entry lacks it
        (a parameter shared by the examples, or one per example). An output's entry may end
        with marks for split factors it lacks: `+r`, a sum over `r`; `~r`, independent of
        `r` (see `sums`).
    - `split`: the factors the call is independent along, space-separated.
    - `combine`: the global value of the outputs summed over a split factor (default:
        `psum`).
    """

    spec: str
    split: str = ""
    combine: Combine | None = None

    def sides(self) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
        """The factors naming each operand's and each output's axes (without the marks)."""
        operands, outputs = self.spec.split("->")
        return _entries(operands), [_axes(e) for e in _entries(outputs)]

    def sums(self) -> list[tuple[str, ...]]:
        """For each output of the (resolved) rule, the split factors it is a sum over: of
        those it lacks that an operand has, the ones marked `+`, and the unmarked ones that
        some operand has together with every split factor the output keeps.

        **Raises:**

        `ValueError` for a mark on a factor that is not split or that the output has, and
        for an unmarked factor that no operand pairs with the output's split factors: the
        output may be a sum over it or independent of it, and taking one for the other
        multiplies or drops values silently.
        """
        operands, outputs = self.sides()
        split = set(self.split.split())
        present = {f for e in operands for f in e}
        marked_entries = _entries(self.spec.split("->")[1])
        sums = []
        for axes, entry in zip(outputs, marked_entries, strict=True):
            marks = {t[1:].rstrip("?"): t[0] for t in entry if t[0] in _MARKS}
            for f in marks:
                if f not in split or f in axes:
                    raise ValueError(
                        f"The sharding rule {self.spec!r} marks {f!r} on the output "
                        f"({' '.join(entry)}), which is not a split factor ({self.split}) "
                        f"that the output lacks; mark only those."
                    )
            kept = split & set(axes)
            summed = []
            for f in sorted(split & present - set(axes)):
                if f not in marks and not any({f, *kept} <= set(e) for e in operands):
                    raise ValueError(
                        f"The sharding rule {self.spec!r} leaves the split factor {f!r} out of "
                        f"the output ({' '.join(entry)}), and no operand has {f!r} together "
                        f"with its split factors ({' '.join(sorted(kept))}): say whether the "
                        f"output is a sum over {f!r} (end its entry with `+{f}`) or "
                        f"independent of it (`~{f}`)."
                    )
                if marks.get(f, "+") == "+":
                    summed.append(f)
            sums.append(tuple(summed))
        return sums

    def resolve(self, args: Sequence[Any]) -> "Rule":
        """The rule with its optional factors kept or dropped by the ranks of `args`."""
        operands, outputs = self.sides()
        if len(args) != len(operands):
            raise ValueError(
                f"The sharding rule {self.spec!r} names {len(operands)} operands, but the "
                f"kernel call has {len(args)}; give one entry per operand."
            )
        resolved = [_resolve(e, a, self.spec) for e, a in zip(operands, args, strict=True)]
        outputs = [tuple(f.rstrip("?") for f in e) for e in _entries(self.spec.split("->")[1])]
        return self._replace(spec=f"{_join(resolved)} -> {_join(outputs)}")

    def vmapped(self, batched: Sequence[bool]) -> "Rule":
        """The (resolved) rule of the call `jax.vmap`ped over the operands flagged `batched`,
        with every output batched: one more split factor, leading."""
        operands, outputs = self.sides()
        taken = {f for entry in operands + outputs for f in entry}
        axis = next(f"vmap{i}" for i in range(len(taken) + 1) if f"vmap{i}" not in taken)
        # Every lacking split factor marked, as the vmapped axis may no longer share an
        # operand with the factors an unmarked sum was read from.
        present = {f for e in operands for f in e}
        lacking = [sorted(set(self.split.split()) & present - set(e)) for e in outputs]
        marks = [
            tuple(f"{'+' if f in summed else '~'}{f}" for f in fs)
            for fs, summed in zip(lacking, self.sums(), strict=True)
        ]
        operands = [(axis, *e) if b else e for e, b in zip(operands, batched, strict=True)]
        outputs = [(axis, *e, *m) for e, m in zip(outputs, marks, strict=True)]
        spec = f"{_join(operands)} -> {_join(outputs)}"
        return Rule(spec, f"{axis} {self.split}", self.combine)


def _entries(side: str) -> list[tuple[str, ...]]:
    return [tuple(entry.split()) for entry in side.split(",")]


# An output's mark for a split factor it lacks: `+r` a sum over `r`, `~r` independent of `r`.
_MARKS = "+~"


def _axes(entry: tuple[str, ...]) -> tuple[str, ...]:
    """An output entry's factors without its marks."""
    return tuple(f for f in entry if f[0] not in _MARKS)


def _join(entries: Sequence[tuple[str, ...]]) -> str:
    return ", ".join(" ".join(e) for e in entries)


def _resolve(entry: tuple[str, ...], arg: Any, spec: str) -> tuple[str, ...]:
    """`entry` for an operand `arg`: every factor when it has that many axes, else without
    the optional ones."""
    required = tuple(f for f in entry if not f.endswith("?"))
    full = tuple(f.rstrip("?") for f in entry)
    if arg is None or len(full) == jnp.ndim(arg):
        return full
    if len(required) == jnp.ndim(arg):
        return required
    raise ValueError(
        f"The sharding rule {spec!r} names the axes ({' '.join(entry)}) for an operand of "
        f"shape {jnp.shape(arg)}; name each axis (optional ones with a trailing `?`)."
    )


def partitioned(fn: Callable[..., Any], rule: Rule) -> Callable[..., Any]:
    """`fn`, run on each device's slice of its split factors when its operands are sharded.

    **Arguments:**

    - `fn(*operands) -> output or tuple of outputs`: a kernel call; operands and outputs are
        arrays or `None`.
    - `rule`: its [`Rule`][].

    **Returns:**

    A function with `fn`'s signature and results, batchable by `jax.vmap`.
    """

    @custom_vmap
    def wrapped(*args):
        return _Call(fn, rule.resolve(args))(*args)

    @wrapped.def_vmap
    def _(axis_size, in_batched, *args):
        if axis_size == 0:
            return empty_batch(wrapped, in_batched, args)
        flags = [bool(b) for b in in_batched]
        example = [_unbatched(a, b) for a, b in zip(args, flags, strict=True)]
        axes = tuple(0 if b else None for b in flags)
        vmapped_rule = rule.resolve(example).vmapped(flags)
        out = partitioned(jax.vmap(fn, in_axes=axes), vmapped_rule)(*args)
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


def gathered(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` on its operands gathered whole onto every device: the call of a kernel without a
    [`Rule`][]. Under `jit` with an Auto mesh XLA gathers them itself; operands whose types
    are sharded over an explicit mesh axis (which `pallas_call` refuses) are `reshard`ed and
    the call runs in a `shard_map` replicated over every axis (the Pallas interpreter needs
    a mesh without explicit axes)."""

    def call(*args):
        mesh = _explicit_mesh(args)
        if mesh is None:
            return fn(*args)
        gathered_args = [
            None if a is None else jax.sharding.reshard(a, NamedSharding(mesh, P())) for a in args
        ]
        replicated = jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(P(),) * len(args),
            out_specs=P(),
            axis_names=set(mesh.axis_names),
            check_vma=False,
        )
        # Without a rule, an output takes the sharding of the first operand of its shape (so
        # a `custom_vjp`'s cotangent is typed like its primal in the common cases).
        shardings: dict[tuple, Any] = {}
        for a in args:
            if a is not None:
                shardings.setdefault(tuple(a.shape), jax.typeof(a).sharding.spec)
        return jax.tree.map(
            lambda o: jax.sharding.reshard(o, NamedSharding(mesh, shardings.get(o.shape, P()))),
            replicated(*gathered_args),
        )

    return call


def empty_batch(fn: Callable[..., Any], in_batched: Any, args: Any) -> tuple[Any, Any]:
    """`(outputs, batched)` of a `custom_vmap` rule of `fn` over a vmapped axis of size 0:
    zeros shaped as `fn`'s outputs on one example (from `jax.eval_shape`) with a leading
    axis of 0, all batched. Nothing is launched: Pallas refuses a grid of no programs, and
    0 folded examples lose the example's row count (`unfold` would divide by 0)."""
    example = [_unbatched(a, bool(b)) for a, b in zip(args, in_batched, strict=True)]
    out = jax.tree.map(lambda s: jnp.zeros((0, *s.shape), s.dtype), jax.eval_shape(fn, *example))
    return out, jax.tree.map(lambda _: True, out)


def _unbatched(a: Any, batched: bool) -> Any:
    """The abstract value of one example of `a` (for a rule depending on the ranks)."""
    if a is None or not batched:
        return a
    return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)


class _Call:
    """One call of a [`partitioned`][] function: its rule resolved against the operands."""

    def __init__(self, fn: Callable, rule: Rule):
        self.fn = fn
        self.rule = rule
        self.operand_factors, self.output_factors = rule.sides()
        self.split = set(rule.split.split())
        self.sums = rule.sums()

    def __call__(self, *args):
        sizes = self.sizes(args)
        if not any(f in self.split for f in sizes):
            return gathered(self.fn)(*args)
        if _explicit_mesh(args) is not None:
            return self.explicit(args, sizes)
        if jax.default_backend() == "tpu" or _deviceless():
            return self.fn(*args)
        return self.custom_partitioned(args, sizes)

    def sizes(self, args: Sequence[Any]) -> dict[str, int]:
        """The size of every factor of the present operands (checked to agree)."""
        sizes: dict[str, int] = {}
        for a, factors in zip(args, self.operand_factors, strict=True):
            if a is None:
                continue
            if len(factors) != a.ndim:
                raise ValueError(
                    f"The sharding rule {self.rule.spec!r} names {len(factors)} axes "
                    f"({' '.join(factors)}) for an operand of shape {a.shape}; name each axis."
                )
            for f, n in zip(factors, a.shape, strict=True):
                if sizes.setdefault(f, n) != n:
                    raise ValueError(
                        f"The sharding rule {self.rule.spec!r} gives factor {f!r} sizes "
                        f"{sizes[f]} and {n}; a factor names axes of one size."
                    )
        return sizes

    def factor_axes(self, specs: Sequence[Any], mesh: Any, sizes: dict, allowed) -> dict:
        """The mesh axes splitting each split factor, read from the operands' partition
        specs (`None` for absent operands): those in `allowed` of the first operand axis of
        that factor which has some, not taken by another factor, and whose shard count
        divides the factor's size."""
        axes: dict[str, tuple] = {}
        used: set = set()
        for spec, factors in zip(specs, self.operand_factors, strict=True):
            if spec is None:
                continue
            for dim, f in enumerate(factors):
                if f not in self.split or f in axes or dim >= len(spec):
                    continue
                # Manual axes (an enclosing `shard_map`'s) have split the data already.
                names = tuple(n for n in _names(spec[dim]) if n in allowed)
                if not names or used & set(names):
                    continue
                if sizes[f] % math.prod(mesh.shape[n] for n in names):
                    continue
                axes[f] = names
                used |= set(names)
        return axes

    def reduced_axes(self, axes: dict) -> tuple:
        """The mesh axes splitting a factor that some output is a sum over."""
        summed = {f for s in self.sums for f in s if f in axes}
        return tuple(n for f in sorted(summed) for n in axes[f])

    def local(self, axes: dict) -> Callable:
        """`fn` on one device's slice, then the collectives of the outputs summed over a
        split factor (`psum` over its mesh axes, or the rule's `combine`)."""
        reduced = self.reduced_axes(axes)

        def local(*args):
            out = self.fn(*args)
            if not reduced:
                return out
            outs = _as_tuple(out)
            if self.rule.combine is not None:
                outs = tuple(self.rule.combine(outs, reduced))
            else:
                outs = tuple(
                    None if o is None else _psum_over(o, summed, axes)
                    for o, summed in zip(outs, self.sums, strict=True)
                )
            return outs if isinstance(out, tuple) else outs[0]

        return local

    # --- explicit meshes: shard_map ------------------------------------------------------------

    def explicit(self, args: Sequence[Any], sizes: dict) -> Any:
        """`fn` in a `shard_map` over every mesh axis (the Pallas interpreter runs only where
        no axis is left explicit), each operand split over the mesh axes of its split factors
        and gathered along the rest; the outputs then get back the shardings their factors
        had in the operands (a `custom_vjp` wants its cotangents typed like its primals)."""
        mesh = _explicit_mesh(args)
        explicit = _explicit_axes(mesh)
        types = [None if a is None else jax.typeof(a).sharding.spec for a in args]
        axes = self.factor_axes(types, mesh, sizes, explicit)
        in_specs = [_spec(f, axes) for f in self.operand_factors]
        args = [
            None if a is None else jax.sharding.reshard(a, NamedSharding(mesh, s))
            for a, s in zip(args, in_specs, strict=True)
        ]
        local_args = [
            None if a is None else jax.ShapeDtypeStruct(_local(a.shape, s, mesh), a.dtype)
            for a, s in zip(args, in_specs, strict=True)
        ]
        shapes = jax.eval_shape(self.fn, *local_args)
        single = not isinstance(shapes, tuple)
        out_specs = tuple(
            None if s is None else _spec(f, axes)
            for s, f in zip(_as_tuple(shapes), self.output_factors, strict=True)
        )
        mapped = jax.shard_map(
            self.local(axes),
            mesh=mesh,
            in_specs=tuple(in_specs),
            out_specs=out_specs[0] if single else out_specs,
            axis_names=set(mesh.axis_names),
            check_vma=False,
        )
        original = self.factor_entries(types, explicit)
        out = tuple(
            None if o is None else jax.sharding.reshard(o, NamedSharding(mesh, _spec(f, original)))
            for o, f in zip(_as_tuple(mapped(*args)), self.output_factors, strict=True)
        )
        return out[0] if single else out

    def factor_entries(self, specs: Sequence[Any], allowed: set) -> dict:
        """The mesh axes (within `allowed`) of each factor in the operands' partition specs:
        the first operand axis of that factor which has some, none used twice."""
        entries: dict[str, tuple] = {}
        used: set = set()
        for spec, factors in zip(specs, self.operand_factors, strict=True):
            if spec is None:
                continue
            for dim, f in enumerate(factors):
                names = _names(spec[dim]) if dim < len(spec) else ()
                if f in entries or not names or used & set(names) or not set(names) <= allowed:
                    continue
                entries[f] = names
                used |= set(names)
        return entries

    # --- Auto meshes: custom_partitioning ------------------------------------------------------

    def custom_partitioned(self, args: Sequence[Any], sizes: dict) -> Any:
        present = [i for i, a in enumerate(args) if a is not None]

        def full(values):
            out = [None] * len(args)
            for i, v in zip(present, values, strict=True):
                out[i] = v
            return out

        traced, shapes = jax.make_jaxpr(lambda *v: self.fn(*full(v)), return_shape=True)(
            *(jax.ShapeDtypeStruct(args[i].shape, args[i].dtype) for i in present)
        )
        single = not isinstance(shapes, tuple)
        outputs = [i for i, s in enumerate(_as_tuple(shapes)) if s is not None]
        consts = list(traced.consts)
        n_consts = len(consts)

        @custom_partitioning
        def op(*operands):
            return tuple(
                jax.core.eval_jaxpr(traced.jaxpr, operands[:n_consts], *operands[n_consts:])
            )

        def partition(mesh, arg_shapes, result_shape):
            del result_shape
            specs = [None] * len(args)
            for i, s in zip(present, arg_shapes[n_consts:], strict=True):
                specs[i] = getattr(s.sharding, "spec", ())
            automatic = {
                n
                for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
                if t != AxisType.Manual
            }
            axes = self.factor_axes(specs, mesh, sizes, automatic)
            local = self.local(axes)

            def lower(*operands):
                out = _as_tuple(local(*full(operands[n_consts:])))
                return tuple(out[i] for i in outputs)

            return (
                mesh,
                lower,
                tuple(NamedSharding(mesh, _spec(self.output_factors[i], axes)) for i in outputs),
                tuple(
                    [NamedSharding(mesh, P())] * n_consts
                    + [NamedSharding(mesh, _spec(self.operand_factors[i], axes)) for i in present]
                ),
            )

        op.def_partition(
            partition=partition,
            sharding_rule=self.shardy_rule(consts, present, outputs),
        )
        out = list(op(*consts, *(args[i] for i in present)))
        results = tuple(out.pop(0) if i in outputs else None for i in range(len(_as_tuple(shapes))))
        return results[0] if single else results

    def shardy_rule(self, consts, present, outputs) -> SdyShardingRule:
        """The rule for Shardy: the split factors pass through, every other factor (and every
        axis of a constant) needs replication."""
        const_factors = [
            tuple(f"const{k}x{d}" for d in range(jnp.ndim(const))) for k, const in enumerate(consts)
        ]
        operands = [*const_factors, *(self.operand_factors[i] for i in present)]
        results = [self.output_factors[i] for i in outputs]
        # Shardy wants the special factors in the order of their first appearance.
        order = dict.fromkeys(f for e in operands + results for f in e)
        return SdyShardingRule(
            tuple(ArrayMapping(*e) for e in operands),
            tuple(ArrayMapping(*e) for e in results),
            need_replication_factors=tuple(f for f in order if f not in self.split),
        )


# --- helpers ----------------------------------------------------------------------------------


def _as_tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _names(entry: Any) -> tuple:
    """The mesh axis names of one `PartitionSpec` entry."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spec(factors: Sequence[str], axes: dict) -> P:
    return P(*(axes.get(f) for f in factors))


def _local(shape: Sequence[int], spec: P, mesh: Any) -> tuple[int, ...]:
    return tuple(
        n // math.prod(mesh.shape[a] for a in _names(entry))
        for n, entry in zip(shape, tuple(spec) + (None,) * len(shape), strict=False)
    )


def _psum_over(out: jax.Array, summed: Sequence[str], axes: dict) -> jax.Array:
    """`out` summed over the mesh axes of the split factors `summed`."""
    names = tuple(n for f in sorted(summed) if f in axes for n in axes[f])
    return lax.psum(out, names) if names else out


def _deviceless() -> bool:
    """Whether the computation is traced for an abstract mesh with no devices behind it
    (`jax.sharding.use_abstract_mesh`, e.g. an `AbstractDevice` to lower for a GPU from a CPU
    machine): `custom_partitioning` needs devices, and there are none to partition over."""
    # `jax.sharding.get_mesh` refuses to run under `jit`; this is what it reads.
    from jax._src.mesh import get_concrete_mesh

    concrete = get_concrete_mesh()
    return not jax.sharding.get_abstract_mesh().empty and (concrete is None or concrete.empty)


def _explicit_axes(mesh: Any) -> set:
    return {
        n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == AxisType.Explicit
    }


def _explicit_mesh(args: Sequence[Any]) -> Any:
    """The mesh of the first operand whose type is sharded over an explicit mesh axis."""
    for a in args:
        if a is None:
            continue
        sharding = jax.typeof(a).sharding
        if any(set(_names(e)) & _explicit_axes(sharding.mesh) for e in sharding.spec):
            return sharding.mesh
    return None
