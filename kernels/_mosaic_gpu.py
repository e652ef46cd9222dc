r"""The Mosaic GPU backend of the GPU kernels: what every `plgpu.kernel` of eqxnorm shares.

JAX 0.11+ deprecates Pallas' Triton backend and points to Mosaic GPU, its GPU backend with a
future, for Hopper (compute capability 9.0) and newer. Mosaic GPU does not lower a
`pl.pallas_call` with block specs: its kernels are `plgpu.kernel`s that move their data
themselves. So the Mosaic GPU kernel bodies (`_row_norm_mosaic_gpu`, `_group_norm_mosaic_gpu`,
`_batch_norm_mosaic_gpu`) are not the Triton/Mosaic TPU bodies written against `_common`'s
masked block access: the programming models part where a block is staged and laid out in
registers. What sits above the launch is shared: the launches have the Triton wrappers'
contracts, and `_common.per_platform` chooses between them under the same autodiff, `vmap`
folding and sharding rules. What the Mosaic GPU kernels share:

**Staging.** A program owns `block_rows` rows and copies their whole width into shared memory
with the Tensor Memory Accelerator (TMA), in boxes of `(block_rows, cols)` (TMA moves at most
256 elements along a dimension, [`boxes`][]), every box of an array arriving on one barrier,
and computes from there: one read of each input from HBM, one write of each output. Rows past
the array's end, and columns past a width that is not a multiple of the box, are filled with
zeros by the TMA on load and dropped by it on store: no masked access, no padding pass. The
only masks left are those of a statistic that zeros would bias (a variance's `x - mean`). Each
box starts at a traced column index ([`dynamic_index`][]), so the last one may run past a
row's end.

**Registers.** Each box is loaded from shared memory in one layout ([`boxes`][]): 4 warps (one
warpgroup) along the rows, each lane 16 contiguous bytes along a row, the 32 lanes of a warp
along one row or, for narrow rows, a few rows. Loads are conflict-free vector loads and a row's
reduction is a warp shuffle; the reductions across rows (the row norms' partial parameter
gradients) go through `REDUCTION_SCRATCH_BYTES` of shared memory. The kernels use Mosaic GPU's
`Lane` lowering with this explicit layout (the default `Warpgroup` semantics' layout inference
was found to fail or take minutes).

**Which shapes.** TMA needs every row to start on 16 bytes: `width × itemsize % 16 == 0`
([`supports`][]). Rows are kept whole on chip when [`boxes`][] finds a tile of rows that fits
`SMEM_BYTES`. A row too wide for a tile of 4 but that fits alone is **folded** (for the kernels
that take it, the row norms' forward and backward): one row per program, its boxes dealt
round the 4 warps (box `4j + w` to warp `w`'s `j`-th tile), so that a tile holds 4 parts of
the same row and a row's sums are combined across the warps ([`across_warps`][]). A row too
wide for one program is **split** across a cluster of up to 8 ([`boxes`][]' `split`): each
program stages a slice of its tiles, and the programs exchange their per-row sums through
distributed shared memory ([`across_cluster`][]). Wider rows still run the Triton kernels,
which read them twice.

**Clusters.** A persistent backward's programs each sum their blocks' float32 partial
parameter gradients per column, which XLA then reduces over the programs: written and read
back, `programs × width` of them cost as much HBM traffic as a few rows of the input
(one program per SM at 1024 × 8192 bfloat16: 16 MiB beside the step's 80). Where they fit
beside the staging ([`boxes`][]' `partials`), a program keeps them in shared memory, and its
grid is launched in clusters of up to 8 programs ([`clustered_programs`][]), which sum each
other's partials through distributed shared memory at the end ([`combine_partials`][], in a
fixed order): one row per cluster reaches HBM. Mosaic GPU's interpreter, which runs the tests,
does not read a peer's shared memory; [`_interpret_cluster_refs`][] teaches it.

**Availability.** [`usable`][]: the installed JAX has the Mosaic GPU API these kernels are
written for (0.12; 0.11.2 lacks `plgpu.store`, which the per-row stores need).
[`target_supported`][]: the GPU compiled for has compute capability 9.0 or more (TMA).
"""

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _tuning

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _API = all(
        hasattr(plgpu, name)
        for name in (
            "kernel",
            "InterpretGPUParams",
            "Layout",
            "Tiling",
            "LoweringSemantics",
            "load",
            "store",
        )
    )
except ImportError:  # pragma: no cover - a jaxlib without Mosaic GPU
    plgpu = None
    _API = False

# Bytes of shared memory a program may stage (227 KiB per block on sm_90, less what the
# kernel keeps for its statistics, barriers and reduction scratch).
SMEM_BYTES = 200 * 1024
# Rows per program when they fit: 16 rows × 256 columns per box is 32 float32 values per
# thread of one warpgroup; fewer for wide rows.
MAX_BLOCK_ROWS = 16
WARPS = 4  # one warpgroup


def usable() -> bool:
    """Whether the installed JAX has the Mosaic GPU API eqxnorm's kernels are written for."""
    if not _API:
        return False
    version = tuple(int(p) for p in jax.__version__.split(".")[:2])
    return version >= (0, 12)


def supports(dtype: Any, width: int) -> bool:
    """Whether a row of `width` elements of `dtype` can be staged by TMA (16-byte rows)."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    return (width * dtype.itemsize) % 16 == 0


# What one SM offers the programs resident on it: shared memory (228 KiB on sm_90 and sm_100),
# and the SMs of the GPU assumed when none is attached (an H100/H200 has 132).
SMEM_PER_SM = 228 * 1024
DEFAULT_SM_COUNT = 132
# At most this many programs of one kernel resident per SM (one warpgroup each): the registers
# of the heaviest kernel (the backward, about 96 per thread) allow 5.
MAX_RESIDENT = 4
# What an SM needs in flight to run an H200's HBM at its bandwidth (Little's law: 4.8 TB/s ×
# about 1 µs of loaded latency, over 132 SMs): 36 KiB. Grids are sized to stage twice that.
IN_FLIGHT_BYTES = 36 * 1024
# Programs per SM the forward grids aim for where the rows allow (several staging at once).
FILL = 2


@functools.cache
def _sm_count() -> int:
    try:
        gpus = jax.devices("cuda")
    except RuntimeError:
        return DEFAULT_SM_COUNT
    return getattr(gpus[0], "core_count", None) or DEFAULT_SM_COUNT


def floor_pow2(n: int) -> int:
    """The largest power of two up to `n` (0 for 0): rows per block that divide the usual
    power-of-two row counts, so that no per-row array is padded to whole programs."""
    return 1 << (n.bit_length() - 1) if n > 0 else 0


class Boxes(NamedTuple):
    """How a program stages its rows of `width` elements of `dtype` (see the module
    docstring): `block_rows` rows (0: they do not fit on chip), in `chunks` TMA boxes of
    `cols` columns, loaded into registers in `layout`, whose tile is `tile_rows` rows (a warp
    holds `tile_rows / 4` rows, its lanes along `cols`)."""

    block_rows: int
    cols: int
    chunks: int
    tile_rows: int
    layout: Any
    # A folded row (see the module docstring): `block_rows` is 1, `chunks` the row's tiles of
    # `tile_rows × cols` (4 boxes each), `row_boxes` its TMA boxes.
    folded: bool = False
    row_boxes: int = 0
    # Shared memory kept beside the staging for the program's float32 partial sums
    # ([`boxes`][]' `partials`): 0 where they accumulate in HBM.
    partial_bytes: int = 0
    # A folded row **split** across a cluster of `split` programs ([`boxes`][]' `split`): each
    # stages `chunks` tiles (`4 · chunks` boxes) of the row's `row_boxes`, program `p` of the
    # cluster boxes `4 · chunks · p` on (the last ones past the row's end: TMA's zeros).
    split: int = 1

    @property
    def arrivals(self) -> int:
        """The TMA copies of one staged array of a program (one barrier arrival each)."""
        if self.split > 1:
            return self.chunks * self.tile_rows
        return self.row_boxes if self.folded else self.chunks

    @property
    def tile(self) -> tuple[int, int, int]:
        """The shape of one staged array of a program in shared memory: its tiles."""
        return (self.chunks, self.tile_rows if self.folded else self.block_rows, self.cols)


def boxes(
    dtypes: tuple[Any, ...],
    rows: int,
    width: int,
    staged_bytes_per_element: int,
    segment: int | None = None,
    groups: int = 1,
    fold: bool = False,
    partials: int = 0,
    box_partials: int = 0,
    split: bool = False,
    together: int = 1,
) -> Boxes:
    r"""The staging of `rows` rows of `width` elements by a kernel that loads arrays of
    `dtypes` into registers and keeps `staged_bytes_per_element` bytes on chip per element
    of its rows (the summed itemsizes of the row arrays it stages; per-row parameters are
    read from HBM, per-column ones staged beside the rows where they fit, by the kernels,
    `_row_norm_mosaic_gpu._staged_boxes`):

    - a lane holds 16 contiguous bytes of the widest of `dtypes` (`vector` elements; every
      array shares the layout, so that they combine elementwise); a row's box is `cols = lanes ×
      vector` columns, `lanes` the largest power of two up to 32 with `cols <= width` (TMA
      may run a box past the end of a row, not a box wider than the row);
    - with a `segment` (the group norms' spatial extent: a row is `width / segment` channels
      of `segment` elements), `cols` also divides `segment`, so that each box lies in one
      channel (no such `cols`: `block_rows` is 0);
    - `chunks = ceil(width / cols)` boxes per row; a warp holds `32 / lanes` rows;
    - `block_rows`: up to `MAX_BLOCK_ROWS` rows (a multiple of the tile's rows), as many as fit
      in `SMEM_BYTES` (a power of two of tiles; 0 if a tile's rows do not), and no more than
      give every SM `FILL` programs: `ceil(groups × rows / (FILL × SMs))` rounded up to
      whole tiles (`groups` grids of `rows` rows each). Larger blocks leave SMs idle or alone
      with one program that waits for its staging (GroupNorm's 512 rows of 4096 elements in
      blocks of 16 rows would run on 32 of an H200's 132 SMs). With `together` (a kernel
      whose program stages one block, the row norms' forward: `FILL`), no more rows than
      leave room for that many programs on an SM at once (`SMEM_PER_SM / together`, less
      what a block keeps beside its staging), where a tile's rows do: one program alone on
      its SM waits for its staging, computes, then waits for its stores, with nothing
      beside it. At 4096 × 8192 bfloat16 the forward's 8 rows (128 KiB) were alone; 4 rows
      (64 KiB) are 3 at once, and the H200's tuner found LayerNorm's training step faster
      with them (1.17 ms against 1.28, benchmarks/results/nvidia-h200/diagnosis).
    - a `block_rows` measured faster on this device (`python -m eqxnorm.tune`) replaces it,
      halved or doubled within what fits (`eqxnorm.kernels._tuning.tuned`), or, for a
      kernel that takes folded rows (`fold`), the rows folded (`_tuning.FOLD`).
    - with `partials` (float32 values per column a program accumulates over its rows: the
      row norms' backward's two partial parameter gradients), shared memory for them is
      kept beside the staging (`partial_bytes`, see [`combine_partials`][]), taken from
      `SMEM_BYTES`, where the rows still fit with it: in fewer rows, or folded (add +
      norm's backward at 8192 bfloat16 stages `x`, `dy` and `dh`, 4 rows in 192 KiB; with
      its 64 KiB of partials, folded rows), since partials written to HBM cost more than
      the smaller blocks; else none, and the partials accumulate in HBM. `box_partials`:
      float32 values per column of one box, summed over a row's boxes too (DyT's α).
    - with `fold` (a kernel that takes folded rows), when not even a tile's rows fit but one
      row does (its `ceil(chunks / 4)` tiles of `4 × cols`): that row **folded**, one per
      program (see the module docstring). With `partials` too (a persistent backward), when
      no more than one tile's rows fit: a tile of rows sums each box's columns across the
      warps (two barriers a box), a folded row's partials are summed within each warp (the
      row norms' backward at 4096 × 8192 bfloat16: each box's pass 98 instructions with 4
      `BAR`, folded 59 with none; deviceless H200, `python -m benchmarks.sass`). The budget
      is an sm_90 block's 227 KiB of shared
      memory: `SMEM_BYTES` (200 KiB) staged, the rest the statistics, barriers and
      `REDUCTION_SCRATCH_BYTES`. The forward stages `x` alone (2 bytes per bf16 element:
      rows up to 102400 bf16, 51200 float32, on chip and read once; a whole 4-row tile
      only up to 25600 bf16); add + norm stages `x` and the residual; the backward `x` and
      `dy` (and `dh`): up to 51200 bf16, 25600 float32 (65536 bf16 would ask 265 KiB,
      which Mosaic GPU refuses). Beyond one row, the Triton kernels read a row twice
      (chunked): a row cannot be split across SMs without a second pass. A folded program
      is one row: 1 block per SM at 64 rows of 70000, each with 137 KiB (bf16) in flight,
      above the `2 × IN_FLIGHT_BYTES` an SM needs. The price is in the backward: a
      persistent program writes one row of float32 partials per parameter gradient, so a
      folded backward's program visits at least `FOLDED_ROWS_PER_PROGRAM` rows, as many as
      a block of the Triton chunked backward it replaces (256 × 32768 bf16: 32 programs,
      1.10× the ideal bytes per training step, each row read once; one row a program would
      be 1.40×). Rows that must fold are not tuned.
    - with `split` too (a kernel that takes split rows, the row norms' forward and
      backward), when not even one row fits: the row folded and **split** across a cluster
      of `split` programs (the fewest, a power of two up to `CLUSTER`), each staging a
      slice of whole tiles and exchanging its per-row sums with the others through
      distributed shared memory ([`across_cluster`][]): every row read once up to 8 × 200
      KiB staged, where the Triton kernels read it twice from 16384 on. A split backward's
      partials are its own columns, which no other program of the cluster has: they must
      stay on chip (its slice chosen with room for them: 70000 bf16, `x` and `dy` 4 bytes
      and the partials 8 bytes per column, in 8 slices of 72 boxes, 108 KiB), or the row is
      not split. A split program also keeps `EXCHANGE_BYTES` for its exchanges. So rows up to
      753664 bf16 (376832 float32) in the forward, 122880 bf16 (94208 float32) in the
      backward.
    """
    staging = functools.partial(
        _staging,
        dtypes,
        rows,
        width,
        staged_bytes_per_element,
        segment,
        groups,
        fold,
        fold_tile=bool(partials) and segment is None,
        together=together,
    )
    kept = staging(SMEM_BYTES, split)
    if kept.split > 1 and (partials or box_partials):
        budget = SMEM_BYTES - 4 * box_partials * 128
        joint = _folded(width, staged_bytes_per_element + 4 * partials, budget, CLUSTER)
        if joint is None:
            return kept._replace(block_rows=0)
        columns = joint.chunks * joint.tile_rows * joint.cols
        return joint._replace(partial_bytes=4 * (partials * columns + box_partials * joint.cols))
    if not (partials or box_partials) or not kept.block_rows:
        return kept
    # The partials' bytes depend on the staging's columns (whole boxes, a folded row's whole
    # tiles), which they may change (a tile of rows folded to make room): twice at most.
    reserve = 0
    for _ in range(3):
        on_chip = staging(SMEM_BYTES - reserve)
        if not on_chip.block_rows:
            return kept
        columns = on_chip.chunks * on_chip.cols * (on_chip.tile_rows if on_chip.folded else 1)
        need = 4 * (partials * columns + box_partials * on_chip.cols)
        if need <= reserve:
            return on_chip._replace(partial_bytes=need)
        reserve = need
    return kept


def _staging(
    dtypes,
    rows,
    width,
    staged_bytes_per_element,
    segment,
    groups,
    fold,
    budget: int,
    split=False,
    fold_tile=False,
    together=1,
) -> Boxes:
    """[`boxes`][] within `budget` bytes of shared memory."""
    vector = 16 // max(jnp.dtype(d).itemsize for d in dtypes)
    lanes = 32
    while lanes > 1 and (
        lanes * vector > width or (segment is not None and segment % (lanes * vector))
    ):
        lanes //= 2
    cols = lanes * vector
    n_chunks = -(-width // cols)
    tile_rows = WARPS * (32 // lanes)
    per_row = n_chunks * cols * staged_bytes_per_element
    fit = floor_pow2(max(budget, 0) // per_row // tile_rows) * tile_rows
    per_sm = -(-rows * groups // (FILL * _sm_count()))
    want = max(tile_rows, min(MAX_BLOCK_ROWS, -(-per_sm // tile_rows) * tile_rows))
    room = SMEM_PER_SM // together - (BLOCK_SMEM_BYTES - SMEM_BYTES)
    at_once = floor_pow2(max(room, 0) // per_row // tile_rows) * tile_rows
    if together > 1 and at_once:
        want = min(want, at_once)
    lane_rows = 32 // lanes
    if lane_rows == 1:
        tiling, warp_dims, lane_dims = ((tile_rows, cols), (vector,)), (-3,), (-2,)
    else:
        tiling = ((tile_rows, cols), (lane_rows, cols), (vector,))
        warp_dims, lane_dims = (-5,), (-3, -2)
    layout = plgpu.Layout.TILED(
        plgpu.Tiling(tiling), warp_dims=warp_dims, lane_dims=lane_dims, vector_dim=-1
    )
    in_segments = segment is None or segment % cols == 0
    chosen = Boxes(min(fit, want) if in_segments else 0, cols, n_chunks, tile_rows, layout)
    foldable = fold and lane_rows == 1 and in_segments
    if foldable and (fit == 0 or (fold_tile and fit == tile_rows)):
        most = CLUSTER if split else 1
        folded = _folded(width, staged_bytes_per_element, budget, most)
        if folded is None:
            return chosen
        # Nothing to vary, but asked all the same: the tuner times the launch (and
        # `impl="auto"` may then choose it over Triton, `_tuning.faster_backend`).
        return _tuning.tuned(folded, "mosaic_gpu", rows, width, most_rows=1)
    # Tiles of rows that could be folded: the tuner may find them faster folded.
    folded = _folded(width, staged_bytes_per_element, budget) if foldable else None
    tuned = _tuning.tuned(chosen, "mosaic_gpu", rows, width, most_rows=fit, fold=bool(folded))
    return folded if tuned.block_rows == 1 and folded else tuned


def _folded(
    width: int, staged_bytes_per_element: int, budget: int, most_split: int = 1
) -> Boxes | None:
    """The folded staging of a row of `width` elements ([`boxes`][]), split across the fewest
    programs (a power of two up to `most_split`) whose slices of whole tiles fit in `budget`
    bytes, or `None` if none does: boxes of 32 lanes of 4 elements (a float32 layout: Mosaic
    GPU reduces across warps, [`across_warps`][], vectors of up to 4 float32)."""
    vector = 4
    cols = 32 * vector
    n_chunks = -(-width // cols)
    layout = plgpu.Layout.TILED(
        plgpu.Tiling(((WARPS, cols), (vector,))), warp_dims=(-3,), lane_dims=(-2,), vector_dim=-1
    )
    split = 1
    while split <= most_split:
        tiles = -(-n_chunks // (WARPS * split))
        # A split row's programs keep their exchanges' tiles beside the staging.
        room = budget - (EXCHANGE_BYTES if split > 1 else 0)
        if tiles * WARPS * cols * staged_bytes_per_element <= room:
            return Boxes(
                1, cols, tiles, WARPS, layout, folded=True, row_boxes=n_chunks, split=split
            )
        split *= 2
    return None


def across_warps(values: Sequence, boxes: Boxes, op: str = "sum") -> list:
    """A folded row's per-warp `values` (each `(4,)`: sums or maxima over each warp's part of
    the row) each combined across the 4 warps (`op`: `"sum"` or `"max"`), the results in every
    warp: one reduction across warps through the reduction scratch (as a box's column sums),
    and back. Value `j` rides in column `j` of one tile, so that the values, up to a box's
    columns, share one reduction and its two barriers (LayerNorm's offset and mean square:
    one exchange, not two). Unfolded rows (one row per warp, or per lane group) are returned
    as they are."""
    values = list(values)
    if not boxes.folded:
        return values
    shape = boxes.tile[1:]
    if len(values) > shape[1]:
        raise ValueError(
            f"{len(values)} values combined across warps at once, more than a box's "
            f"{shape[1]} columns: combine them in groups of at most {shape[1]}."
        )
    reduce = jnp.sum if op == "sum" else jnp.max
    col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=boxes.layout)

    def tile(v):
        return plgpu.layout_cast(jax.lax.broadcast_in_dim(v, shape, [0]), boxes.layout)

    spread = tile(values[0])
    for j, v in enumerate(values[1:], 1):
        spread = jnp.where(col == j, tile(v), spread)
    column = reduce(spread, axis=0)
    back = plgpu.layout_cast(jax.lax.broadcast_in_dim(column, shape, [1]), boxes.layout)
    if len(values) == 1:  # every column holds it
        return [jnp.max(back, axis=1)]
    return [jnp.max(jnp.where(col == j, back, -jnp.inf), axis=1) for j in range(len(values))]


# A folded backward's program visits at least this many rows (one per block): as many as a
# block of the Triton chunked backward it replaces (`_common.CHUNK_ROWS`), so that it writes no
# more float32 partial rows than that one, while reading each row once instead of twice. With
# one row per program, 256 rows of 32768 bf16 would write 256 partial rows for 256 rows of
# `x`: 1.40× the ideal bytes per training step instead of 1.2×.
FOLDED_ROWS_PER_PROGRAM = 8


def persistent_programs(
    blocks: int, program_smem_bytes: int, groups: int = 1, min_iterations: int = 1
) -> tuple[int, int]:
    r"""`(programs, iterations)` per group of a persistent grid over `groups × blocks` row
    blocks: `SMs × resident / groups` programs (at least 1), `resident` the fewest per SM
    that stage `2 × IN_FLIGHT_BYTES` at once (a program stages `program_smem_bytes`, both
    slots of a pipelined one), within what shared memory holds and `MAX_RESIDENT`; each loops
    over `iterations = ceil(blocks / that)` blocks, and then as few programs as give every one
    `iterations` blocks (`programs × iterations - blocks < programs` blocks past the end,
    which read TMA's zeros and store nothing). More programs would not move data faster:
    they would only write more per-program partial sums (the row norms' backward, whose
    parameter-gradient partials are `programs × width` float32 instead of `blocks ×
    width`). `min_iterations`: the fewest blocks a program visits (fewer programs, at most
    `blocks`), `FOLDED_ROWS_PER_PROGRAM` for folded rows."""
    most = max(1, _sm_count() * _resident(program_smem_bytes) // groups)
    iterations = min(max(-(-blocks // most), min_iterations), blocks)
    programs = -(-blocks // iterations)
    return programs, -(-blocks // programs)


def _resident(program_smem_bytes: int) -> int:
    """Programs per SM of a persistent grid ([`persistent_programs`][])."""
    program_smem_bytes = max(program_smem_bytes, 1)
    needed = -(-2 * IN_FLIGHT_BYTES // program_smem_bytes)
    return max(1, min(MAX_RESIDENT, SMEM_PER_SM // program_smem_bytes, needed))


# The most programs of a cluster ([`clustered_programs`][]): 8, the largest cluster every sm_90
# GPU launches ("portable").
CLUSTER = 8
# SMs per GPC that clusters of up to 8 fill: an H100/H200's 132 SMs are GPCs of 16 or 18,
# each holding two clusters of 8 programs (one per SM), 128 SMs in all.
GPC_SMS = 16


def clustered_programs(
    blocks: int, program_smem_bytes: int, groups: int = 1, min_iterations: int = 1
) -> tuple[int, int, int]:
    r"""`(programs, iterations, cluster)`: [`persistent_programs`][]' grid with its programs
    in clusters of `cluster` (a power of two up to `CLUSTER`, as many as there are
    programs), whose partial sums are combined on chip ([`combine_partials`][]): `cluster`
    times fewer partial sums written to HBM and read back. `programs` is a multiple of
    `cluster` (rounded up: a program past the last block revisits it, see
    `_row_norm_mosaic_gpu._window`), and no more than run at once: clusters are launched
    whole into one GPC, so of each GPC's SMs only whole clusters' count (`GPC_SMS` per GPC,
    128 of an H200's 132 SMs for clusters of 8; a cluster past those would run after the
    others, doubling the kernel's time). A cluster of 1 is none."""
    programs, iterations = persistent_programs(blocks, program_smem_bytes, groups, min_iterations)
    size = min(CLUSTER, floor_pow2(programs))
    if size < 2:
        return programs, iterations, 1
    at_once = _sm_count() // GPC_SMS * GPC_SMS * _resident(program_smem_bytes) // groups
    rounded = -(-programs // size) * size
    programs = rounded if rounded <= at_once else max(size, at_once // size * size)
    iterations = max(iterations, -(-blocks // programs))
    per_iteration = -(-blocks // iterations)
    programs = -(-per_iteration // size) * size
    return programs, iterations, size


def split_programs(
    blocks: int, program_smem_bytes: int, split: int, groups: int = 1, min_iterations: int = 1
) -> tuple[int, int]:
    """`(clusters, iterations)` per group of a persistent grid over `blocks` rows, each split
    across a cluster of `split` programs ([`boxes`][]' `split`): as many clusters as run at
    once (whole clusters per GPC, [`clustered_programs`][]), each visiting at least
    `min_iterations` rows (a folded backward's `FOLDED_ROWS_PER_PROGRAM`: one row of partials
    per cluster), and then as few clusters as give each one `iterations` rows."""
    per_gpc = GPC_SMS * _resident(program_smem_bytes) // split
    at_once = max(1, _sm_count() // GPC_SMS * per_gpc // groups)
    iterations = min(max(-(-blocks // at_once), min_iterations), blocks)
    clusters = -(-blocks // iterations)
    return clusters, -(-blocks // clusters)


# Shared memory for reductions across the warps (a box's column sums: 4 warps × 256 float32).
REDUCTION_SCRATCH_BYTES = 8 * 1024
# The most shared memory one block may have on sm_90 (227 KiB), and what is kept of it for
# the barriers and their alignment.
BLOCK_SMEM_BYTES = 227 * 1024
BARRIER_SLACK_BYTES = 1024


def smem_bytes(scratch: list) -> int:
    """The bytes of the shared memory buffers (`plgpu.SMEM`) among a kernel's `scratch`
    types (barriers are `BARRIER_SLACK_BYTES`' concern)."""
    return sum(
        math.prod(t.shape) * jnp.dtype(t.dtype).itemsize
        for t in scratch
        if hasattr(t, "shape") and hasattr(t, "dtype")
    )


def fits_block(program_bytes: int) -> bool:
    """Whether a program whose buffers take `program_bytes` of shared memory (staging, and
    what it keeps beside it) fits in one block, with the reduction scratch and barriers."""
    return program_bytes + REDUCTION_SCRATCH_BYTES + BARRIER_SLACK_BYTES <= BLOCK_SMEM_BYTES


def resident_by_smem(program_bytes: int) -> int:
    """Programs with buffers of `program_bytes` that one SM's shared memory holds at once."""
    return SMEM_PER_SM // (program_bytes + REDUCTION_SCRATCH_BYTES + BARRIER_SLACK_BYTES)


def compiler_params(auto_barriers: bool = True) -> Any:
    """eqxnorm's Mosaic GPU compiler parameters; without `auto_barriers`, see [`kernel`][]."""
    return plgpu.CompilerParams(
        lowering_semantics=plgpu.LoweringSemantics.Lane,
        reduction_scratch_bytes=REDUCTION_SCRATCH_BYTES,
        unsafe_no_auto_barriers=not auto_barriers,
    )


# Set to 1, every kernel keeps Mosaic GPU's automatic barriers (a diagnosis: whether a result
# that differs on a GPU comes from a barrier a body leaves out).
AUTO_BARRIERS_ENV = "EQXNORM_MOSAIC_GPU_AUTO_BARRIERS"

_DETECT_RACES: contextvars.ContextVar[bool] = contextvars.ContextVar("races", default=False)


@contextlib.contextmanager
def detecting_races():
    """Within: the kernels traced for Mosaic GPU's interpreter check their memory accesses for
    races, each logged as a warning (`RACE DETECTED`, with both accesses: their buffers,
    memory spaces and source lines). The interpreter keeps a vector clock per program's
    warpgroup and per TMA engine, so it sees accesses unordered across programs (a
    cluster's distributed shared memory, HBM) and across TMA engines; not the warps of one
    warpgroup, which it runs as one, nor a program's own TMA copies against its warpgroup,
    which it runs in order with it (a buffer read before its load's barrier is waited for,
    or written while a store still reads it, goes unseen). The tests run the kernels that
    keep no automatic barriers ([`kernel`][]) under it."""
    token = _DETECT_RACES.set(True)
    try:
        yield
    finally:
        _DETECT_RACES.reset(token)


def kernel(body, *, interpret: bool, auto_barriers: bool = True, cluster: int = 1, **kwargs) -> Any:
    """`plgpu.kernel(body, **kwargs)` with eqxnorm's compiler parameters, run by Mosaic GPU's
    interpreter when `interpret` (on CPU: the tests).

    By default Mosaic GPU puts a warpgroup barrier (`bar.sync`, a whole block here) before
    and after every store to shared memory and before every TMA load, in case another thread
    reads or writes the same bytes: the forward kernels had 15 to 41 of them (issue 17 asks
    at most 5), and the row norms' backward 10 in each box's pass (104 instructions of SASS,
    bf16 LayerNorm at 4096 × 8192; 6 in a folded tile's 72), where without them it has 4
    (its two sums across the warps) and 0. A body may turn them off (`auto_barriers=False`)
    when it keeps this discipline, which makes them needless: its shared memory is written
    only by TMA loads into buffers no thread has used yet (after their barrier's wait) and
    by each thread over the elements it has itself read, in the layout it read them in (a
    box's `y` over its `x`); the only other reader is a TMA store, after `plgpu.commit_smem`
    (a fence and a barrier); sums that are the same in every warp (a box's column sums) are
    read before a reduction across the warps and written after it, whose barriers order
    them. What stays: the barrier after the barriers' initialisation, `commit_smem`'s, the
    final `wait_smem_to_gmem`'s, and those of reductions across warps (Mosaic GPU's own,
    through its reduction scratch). The interpreter runs such a body as before.

    With `cluster` > 1 the first grid axis is launched in clusters of that many programs
    (axis `"cluster"` within one, [`program_index`][]), which may read each other's shared
    memory ([`combine_partials`][]). The interpreter ignores the fences of [`cluster_sync`][]
    (it orders memory by its barriers alone) and reads a peer's shared memory as
    [`_interpret_cluster_refs`][] teaches it. `EQXNORM_MOSAIC_GPU_AUTO_BARRIERS=1` keeps the
    automatic barriers in every kernel."""
    if os.environ.get(AUTO_BARRIERS_ENV) == "1":
        auto_barriers = True
    if cluster > 1:
        kwargs.update(cluster=(cluster,), cluster_names=("cluster",))
        if interpret:
            _interpret_cluster_refs()
    return plgpu.kernel(
        body,
        compiler_params=compiler_params(auto_barriers),
        interpret=_interpret_params() if interpret else None,
        **kwargs,
    )


def _interpret_params() -> Any:
    """Mosaic GPU's interpreter's parameters: inline MGPU ([`_fence_cluster`][]) ignored, and
    races detected and logged within [`detecting_races`][]."""
    if _DETECT_RACES.get():
        return plgpu.InterpretGPUParams(inline_mgpu="ignore", detect_races=True, on_race="warn")
    return plgpu.InterpretGPUParams(inline_mgpu="ignore")


def program_index(cluster: int) -> Any:
    """The program's index along the first grid axis (`"rows"`) of a [`kernel`][] launched in
    clusters of `cluster`: `cluster` consecutive programs per cluster."""
    if cluster == 1:
        return jax.lax.axis_index("rows")
    return jax.lax.axis_index("rows") * cluster + jax.lax.axis_index("cluster")


def _fence_cluster() -> None:
    """`fence.acq_rel.cluster`: this thread's memory accesses before it ordered, for every
    thread of the cluster, before its accesses after it (PTX, inlined)."""
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import llvm

    @plgpu.inline_mgpu()
    def fence(_):
        void = ir.Type.parse("!llvm.void")
        llvm.inline_asm(void, [], "fence.acq_rel.cluster;", "", has_side_effects=True)

    fence()


def cluster_sync(barrier) -> None:
    """Wait until every program of the cluster has reached this point, with every shared
    memory write of theirs before it visible to the reads after it: the program's threads
    synchronised (`plgpu.commit_smem`'s warpgroup barrier: a cluster barrier's arrival for
    the program is made by a few of its threads, which must come after all of its writes),
    then `barrier` (a `plgpu.ClusterBarrier` over `"cluster"`, one arrival per program, used
    once) arrived at and waited for, between two cluster-scope fences (a barrier's arrival
    releases and its wait acquires only within the program's own block)."""
    plgpu.commit_smem()
    _fence_cluster()
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)
    _fence_cluster()


def cluster_barriers(cluster: int) -> list:
    """The scratch of [`combine_partials`][]: its two cluster barriers (none without a
    cluster)."""
    if cluster == 1:
        return []
    return [plgpu.ClusterBarrier(collective_axes=("cluster",), num_barriers=2)]


def combine_partials(accs, store, layout, cluster: int, barriers) -> None:
    r"""Hand the sums of a cluster's partial sums to `store(a, s, k, total)`: each of `accs`
    `(parts, n, ...)`, a program's float32 partial sums in shared memory, loaded in
    `layout` (or each in its own, a list); each program of the cluster sums `accs[a][s, k]`
    over the cluster's programs, in their order (deterministic), for its share of `k` (`k ≡`
    its index in the cluster, mod `cluster`), reading the others' from their shared memory
    (distributed shared memory, `plgpu.cluster_ref`). Every program has written its `accs`
    when any reads them, and has read all it needs before any exits (`barriers`,
    [`cluster_barriers`][]). With `cluster` 1, the program's own sums, read after a barrier
    (`plgpu.commit_smem`'s: the row norms' backward has no automatic barriers, and sums the
    same in every warp may have been stored by one). A cluster of $c$ programs writes one
    row of partials to HBM for the $c$ rows its programs would: the row norms' backward at
    1024 × 8192 bfloat16, 128 programs writing and XLA re-reading `2 × 8192` float32 each,
    moved 16 MiB beside its 80 MiB step (1.20×), in clusters of 8 2 MiB (1.03×)."""
    if cluster > 1:
        cluster_sync(barriers[0].at[0])
    else:  # every warp's stores before any warp's reads (without automatic barriers too)
        plgpu.commit_smem()
    me = jax.lax.axis_index("cluster") if cluster > 1 else 0
    layouts = layout if isinstance(layout, list) else [layout] * len(accs)
    for a, acc in enumerate(accs):
        _combine_one(acc, functools.partial(store, a), layouts[a], cluster, me)
    if cluster > 1:
        cluster_sync(barriers[0].at[1])


def _combine_one(acc, store, layout, cluster: int, me) -> None:
    """[`combine_partials`][] of one array of partial sums, `store(s, k, total)`."""
    parts, n = acc.shape[:2]

    def peer(p):
        return acc if cluster == 1 else plgpu.cluster_ref(acc, {"cluster": p})

    @pl.loop(0, -(-n // cluster))
    def _(j):
        k = j * cluster + me

        def combine():
            for s in range(parts):
                total = plgpu.load(peer(0).at[s, k], layout=layout, optimized=False)
                for p in range(1, cluster):
                    total = total + plgpu.load(peer(p).at[s, k], layout=layout, optimized=False)
                store(s, k, total)

        if n % cluster:
            pl.when(k < n)(combine)
        else:
            combine()


# Shared memory a split row's program keeps for its exchanges ([`exchange_scratch`][]): at most
# 4 slots of 2 per-row values, each a float32 tile of 4 × 128 (the forward's), taken from the
# staging's `SMEM_BYTES` (without it a slice of 200 KiB overflowed an sm_90 block's 227 KiB).
EXCHANGE_BYTES = 4 * 2 * WARPS * 128 * 4


def exchange_scratch(boxes: Boxes, values: int, slots: int) -> list:
    """The scratch of [`across_cluster`][]: `slots` exchanges of up to `values` per-row values
    (a tile each) and their cluster barriers."""
    return [
        plgpu.SMEM((slots, values, *boxes.tile[1:]), jnp.float32),
        plgpu.ClusterBarrier(collective_axes=("cluster",), num_barriers=slots),
    ]


def across_cluster(values, boxes: Boxes, scratch, slot, op: str = "sum") -> list:
    """A split row's per-row `values` (each `(4,)`, already combined across the program's
    warps, [`across_warps`][]) combined across the `boxes.split` programs of its cluster
    (`op`: `"sum"` or `"max"`), in their order (the same bits in every program): each value
    broadcast to a tile and written to the program's shared memory `scratch[0][slot]`
    ([`exchange_scratch`][]), every program's read through distributed shared memory after
    [`cluster_sync`][] on `scratch[1][slot]`. A slot is written again no sooner than two
    exchanges later (`slot` alternating; one exchange is the cluster's barrier: every
    program has read the slot's values before any passes the next exchange), and each
    program synchronises once more before it exits (`across_cluster([], ...)`), so that no
    program's shared memory is read after it has ended."""
    buf, barrier = scratch
    for v, value in enumerate(values):
        spread = jax.lax.broadcast_in_dim(value, boxes.tile[1:], [0])
        buf[slot, v] = plgpu.layout_cast(spread, boxes.layout)
    cluster_sync(barrier.at[slot])
    combine = jnp.add if op == "sum" else jnp.maximum
    out = []
    for v in range(len(values)):
        total = None
        for p in range(boxes.split):
            peer = plgpu.cluster_ref(buf, {"cluster": p}).at[slot, v]
            tile = plgpu.load(peer, layout=boxes.layout, optimized=False)
            total = tile if total is None else combine(total, tile)
        out.append(jnp.max(total, axis=1))
    return out


@functools.cache
def _interpret_cluster_refs() -> None:
    """Teach Mosaic GPU's interpreter (JAX 0.12) to read a peer's shared memory in a cluster
    (`plgpu.cluster_ref`, which it refuses): an interpreted program's buffers are keyed by
    its block's index in the cluster (the same buffers in the same order in each), so the
    read goes to the peer's key. For one-dimensional clusters, eqxnorm's."""
    import dataclasses

    import numpy as np
    from jax._src.pallas.mosaic_gpu import core as gpu_core
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, shared_memory

    fields = [f.name for f in dataclasses.fields(shared_memory.HostAllocationKey)]
    block = fields.index("block_id")
    get = gpu_callbacks._get

    def _get(token, mesh_location, thread, key, transforms, *args, **kwargs):
        peers = [t for t in transforms if isinstance(t, gpu_core.ClusterRefTransform)]
        if peers:
            key = np.array(key).copy()
            key[block] = int(peers[-1].idxs[0])
            transforms = tuple(
                t for t in transforms if not isinstance(t, gpu_core.ClusterRefTransform)
            )
        return get(token, mesh_location, thread, key, transforms, *args, **kwargs)

    gpu_callbacks._get = _get


def dynamic_index(zero: Any, index: int) -> Any:
    """`index` as a traced integer (`zero` is a traced 0): a TMA box's start is then not
    checked statically against the array's bounds, so the last box may run past the end of a
    row, where the TMA fills zeros on load. A store must not (`_row_norm_mosaic_gpu._copy_out`:
    a one-row box is stored as contiguous bytes, bounded by the array's end alone)."""
    return zero + index


@functools.cache
def _device_capability() -> tuple[int, int] | None:
    try:
        gpus = jax.devices("cuda")
    except RuntimeError:
        return None
    capability = getattr(gpus[0], "compute_capability", None) if gpus else None
    if capability is None:
        return None
    major, minor = str(capability).split(".")[:2]
    return int(major), int(minor)


def target_supported() -> bool:
    """Whether the GPU being compiled for has TMA (compute capability >= 9.0): the attached
    GPU, else the one assumed without one (`_triton.DEFAULT_GPU`, an H100)."""
    capability = _device_capability()
    return capability is None or capability >= (9, 0)
