"""The kernels' shared machinery (`eqxnorm.kernels._common`): the one block heuristic and
Chan's combination of partial statistics."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from eqxnorm.kernels import _common as c, _mosaic_gpu

WIDTHS = (1, 3, 160, 760, 1024, 4096, 16384, 16385, 70000, 262144)
ROWS = (1, 37, 199, 4096)


def _is_pow2(n):
    return n & (n - 1) == 0


@pytest.mark.parametrize("one_row", [False, True])
@pytest.mark.parametrize("target", [c.TRITON, c.INTERPRET], ids=lambda t: t.name)
def test_triton_blocks_are_powers_of_two_covering_the_row(target, one_row):
    for rows, width in itertools.product(ROWS, WIDTHS):
        config = c.block_config(target, rows, width, one_row=one_row)
        assert _is_pow2(config.block_rows) and _is_pow2(config.block_cols)
        assert config.row_cols >= width > config.row_cols - config.block_cols
        assert config.block_rows * config.block_cols <= c.MAX_BLOCK_ELEMENTS
        assert 1 <= config.num_warps <= 16 and _is_pow2(config.num_warps)


def test_narrow_rows_are_grouped_and_wide_rows_chunked():
    for width in (160, 760):
        config = c.block_config(c.TRITON, 4096, width)
        assert config.chunks == 1 and config.block_rows >= 4, width
        assert config.block_rows * config.block_cols >= c.TARGET_BLOCK_ELEMENTS // 2
    assert c.block_config(c.TRITON, 4096, 1).block_rows == c.MAX_BLOCK_ROWS
    assert c.block_config(c.TRITON, 4096, 16384).chunks == 1  # one pass up to 16384 features
    wide = c.block_config(c.TRITON, 4096, 262144)
    assert (wide.block_rows, wide.block_cols, wide.chunks) == (8, 1024, 256)
    assert wide.num_stages == 2
    # A single short input is not given a block of rows it cannot fill.
    assert c.block_config(c.TRITON, 1, 160).block_rows == 1
    assert c.block_config(c.TRITON, 37, 160).block_rows == 16


def test_one_row_programs_for_rows_wider_than_a_warp():
    # The forwards' launch: a row spanning warps has a program of its own (its statistics are
    # then stored without a layout conversion); one warp's rows are grouped as before.
    for width in (129, 760, 1024, 16384):
        config = c.block_config(c.TRITON, 4096, width, one_row=True)
        assert (config.block_rows, config.chunks) == (1, 1)
        # 8 elements per thread, half the default: fewer live registers.
        assert config.num_warps == min(max(config.block_cols // 256, 1), 16)
    for width in (1, 100, c.WARP_COLS):
        assert c.block_config(c.TRITON, 4096, width, one_row=True) == c.block_config(
            c.TRITON, 4096, width
        )
    wide = c.block_config(c.TRITON, 64, 70000, one_row=True)
    assert (wide.block_rows, wide.block_cols, wide.chunks) == (1, c.TARGET_BLOCK_ELEMENTS, 18)
    assert wide.num_warps == 16  # 8 elements per thread in a chunk loop
    assert c.block_config(c.MOSAIC, 4096, 1024, one_row=True) == c.block_config(
        c.MOSAIC, 4096, 1024
    )


def test_mosaic_blocks_follow_tpu_tiling():
    for rows, width in itertools.product(ROWS, WIDTHS):
        config = c.block_config(c.MOSAIC, rows, width)
        assert config.block_rows % 8 == 0
        # The minor block dimension is the whole row, or 128-lane multiples dividing it.
        assert config.block_cols == width or (
            config.block_cols % 128 == 0 and width % config.block_cols == 0
        )
        assert config.row_cols == width


def test_chan_combination_matches_float64_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(1e4, 1.0, size=(3, 5000)).astype(np.float32)
    shift = x[:, :1]
    partial = None
    for piece in np.array_split(x - shift, [7, 1000, 1001, 4096], axis=1):
        d = jnp.asarray(piece)
        part = c.chunk_partial(d, jnp.ones(d.shape, bool))
        partial = part if partial is None else c.chan_combine(partial, part)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(partial.n[:, 0], 5000)
    np.testing.assert_allclose(
        np.asarray(partial.mean[:, 0]) + shift[:, 0], x64.mean(1), rtol=0, atol=1e-3
    )
    np.testing.assert_allclose(np.asarray(partial.m2[:, 0]) / 5000, x64.var(1), rtol=1e-5)


def test_block_moments_about_the_first_element():
    # The shift is the row's first element, given (read on its own by a Triton forward) or
    # reduced for; a first element far out (a massive activation) costs no accuracy, since
    # the variance is a second pass about the mean, and a constant row is exactly centred.
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, size=(3, 1000)).astype(np.float32)
    x[0, 0] += 1e3  # about 30 standard deviations of the row (itself included) out
    x[1] += 1e4
    x[2] = 7.25
    xs, mask = jnp.asarray(x), jnp.ones(x.shape, bool)
    x64 = x.astype(np.float64)
    for first in (None, xs[:, :1]):
        stats = c.block_moments(xs, mask, 1000, center=True, first=first)
        np.testing.assert_array_equal(stats.shift, xs[:, :1])
        mean = np.asarray(stats.shift, np.float64) + np.asarray(stats.offset, np.float64)
        # Off by the rounding of `offset`, about u·|x₀ − μ|: small beside the row's spread.
        assert np.all(np.abs(mean[:2, 0] - x64[:2].mean(1)) <= 1e-5 * x64[:2].std(1))
        np.testing.assert_allclose(stats.var[:2, 0], x64[:2].var(1), rtol=1e-5)
        assert stats.offset[2, 0] == 0.0 and stats.var[2, 0] == 0.0


def test_block_moments_masks_padding():
    x = jnp.asarray(np.random.default_rng(1).normal(3.0, 2.0, size=(4, 8)).astype(np.float32))
    mask = jnp.arange(8)[None, :] < 5
    stats = c.block_moments(jnp.where(mask, x, 0.0), mask, 5, center=True)
    x5 = np.asarray(x[:, :5], np.float64)
    np.testing.assert_allclose(stats.shift + stats.offset, x5.mean(1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(stats.var, x5.var(1, keepdims=True), rtol=1e-5)
    rms = c.block_moments(jnp.where(mask, x, 0.0), mask, 5, center=False)
    np.testing.assert_allclose(rms.var, (x5**2).mean(1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("like_dtype", [jnp.float32, jnp.bfloat16, None], ids=str)
def test_sum_parts_sums_each_part_in_one_reduction(like_dtype):
    """Parts of one shape (variadic for float32 sums, else stacked) and of different widths
    (concatenated) give each part's own sums, exactly those of a float64 sum here (small
    integers)."""
    rng = np.random.default_rng(0)
    like = None if like_dtype is None else jnp.zeros((3,), like_dtype)
    same = [rng.integers(-8, 8, (5, 4, 3)).astype(np.float32) for _ in range(3)]
    for axes in ((0,), (0, 1), (1,)):
        sums = c.sum_parts([jnp.asarray(p) for p in same], axes=axes, like=like)
        for got, part in zip(sums, same, strict=True):
            np.testing.assert_array_equal(np.asarray(got), part.sum(axis=axes))
    widths = [rng.integers(-8, 8, (6, n)).astype(np.float32) for n in (7, 7, 1)]
    sums = c.sum_parts([jnp.asarray(p) for p in widths], axes=(0,), like=like)
    assert [s.shape for s in sums] == [(7,), (7,), (1,)]
    for got, part in zip(sums, widths, strict=True):
        np.testing.assert_array_equal(np.asarray(got), part.sum(axis=0))


def test_sum_parts_rejects_parts_it_cannot_concatenate():
    parts = [jnp.zeros((4, 3)), jnp.zeros((4, 1))]
    with pytest.raises(ValueError, match=r"over axis 0, not over axes \(1,\)"):
        c.sum_parts(parts, axes=(1,))
    with pytest.raises(ValueError, match="pass 2-D parts"):
        c.sum_parts([jnp.zeros((4, 3)), jnp.zeros((5, 1))], axes=(0,))


def test_few_rows_backward_programs_keep_partials_small(monkeypatch):
    # 37 rows of 760 float32 in blocks of 4 (10 blocks, fewer than the 132 SMs): each program
    # reads at least 32 times its partial sums' 2 x 760 float32, so 8 blocks, 2 programs of 5
    # (Triton's grid was 10 programs: 1.21x a training step's ideal bytes). Blocks that fill
    # the GPU keep one program per SM's share.
    monkeypatch.setattr(_mosaic_gpu, "_sm_count", lambda: 132)
    assert c.partial_iterations(10, 1, 4 * 760 * 8, 760) == 8
    assert c.partial_iterations(10, 1, 4 * 760 * 4, 760) == 16
    assert c.partial_iterations(132, 1, 4 * 760 * 8, 760) == 1
    assert c.partial_iterations(10, 14, 4 * 760 * 8, 760) == 1
    # 64 rows of 70000 float32 in blocks of 8: few blocks, but 36 MB to spread over the SMs.
    assert c.partial_iterations(8, 1, 8 * 70000 * 8, 70000) == 1
    config = c.block_config(c.INTERPRET, 37, 760)
    plan = c.persistent_config(config, 37, 1, 760, 8)
    blocks = -(-37 // config.block_rows)
    assert (plan.programs, plan.iterations) == (2, -(-blocks // 2))
    assert c.persistent_config(config, 37) == c.persistent_config(config, 37, 1, 0, 0)
