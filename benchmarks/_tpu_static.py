"""What a TPU would get from eqxnorm's Mosaic kernels, found on a machine without one.

`jax.experimental.topologies` describes a TPU slice (here one v5e chip) from libtpu alone, and
`jax.jit(fn).lower(...).compile()` then runs XLA's TPU compiler, Mosaic included, for it: every
kernel's block shapes, its VMEM footprint and its (8, 128) tiling are checked by the compiler
that would run them, which export alone does not do. Needs libtpu matching jaxlib (`pip install
-e ".[tpu-check]"`, JAX's own `tpu` extra) and `JAX_PLATFORMS=cpu`.
"""

import dataclasses
import re
import time

import jax

TOPOLOGY = "v5e:1x1"


@dataclasses.dataclass
class TpuReport:
    """`jax.jit(fn)` compiled for a TPU it does not have: the seconds the compile took, the
    Mosaic kernels of the compiled program (their names) and what failed."""

    seconds: float
    kernels: list[str]
    problems: list[str]


def tpu_compile(fn, *args, topology: str = TOPOLOGY) -> TpuReport:
    """Compile `jax.jit(fn)(*args)` for `topology` without a TPU; a compile error is a
    problem of the report, not an exception."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    mesh = topologies.make_mesh(topo, (1,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    start = time.time()
    try:
        text = jax.jit(fn).lower(*specs).compile().as_text()
    except Exception as error:  # Mosaic's and XLA's messages name the kernel and the limit
        return TpuReport(time.time() - start, [], [f"TPU compile: {str(error)[:800]}"])
    names = [
        m.group(1)
        for line in text.splitlines()
        if 'custom_call_target="tpu_custom_call"' in line
        and (m := re.match(r"\s*(?:ROOT )?%([\w]+)", line))
    ]
    return TpuReport(time.time() - start, names, [])
