"""Independent float64 NumPy implementations of every normalization, and the per-dtype
tolerance table every comparison uses.

Written directly from the formulas (np.mean/np.var in float64), sharing no code with
eqxnorm, so that the reference is checked against something it could not have copied a bug
from.
"""

import jax.numpy as jnp
import numpy as np

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# (rtol, atol) for an output of the given dtype against the float64 oracle evaluated on the
# same (already rounded) input. Half-precision outputs carry a rounding error of half an ulp
# (eps/2 relative) plus float32 statistics; float32 outputs carry only the float32 statistics
# error, which grows slowly with width (pairwise summation), hence 1e-5 up to 4096+ features.
_BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # 2**-7
_F16_EPS = float(jnp.finfo(jnp.float16).eps)  # 2**-10
TOLERANCES = {
    jnp.dtype(jnp.float64): (1e-12, 1e-12),
    jnp.dtype(jnp.float32): (1e-5, 1e-5),
    jnp.dtype(jnp.bfloat16): (_BF16_EPS, _BF16_EPS),
    jnp.dtype(jnp.float16): (_F16_EPS, _F16_EPS),
}


def assert_close(actual, expected, dtype=None, *, scale=1.0):
    """Compare against the oracle with the tolerance of `dtype` (default: `actual.dtype`),
    multiplied by `scale` for quantities with a known larger error (gradients)."""
    dtype = jnp.dtype(actual.dtype if dtype is None else dtype)
    rtol, atol = TOLERANCES[dtype]
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=rtol * scale,
        atol=atol * scale,
    )


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * f64(weight).reshape(shape)
    if bias is not None:
        y = y + f64(bias).reshape(shape)
    return y


def layer_norm(x, weight, bias, eps, ndim=1):
    """Normalize over the trailing `ndim` axes."""
    x = f64(x)
    axes = tuple(range(x.ndim - ndim, x.ndim))
    y = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)
    return _affine(y, weight, bias, x.shape[x.ndim - ndim :])


def rms_norm(x, weight, bias, eps, ndim=1):
    x = f64(x)
    axes = tuple(range(x.ndim - ndim, x.ndim))
    y = x / np.sqrt((x**2).mean(axes, keepdims=True) + eps)
    return _affine(y, weight, bias, x.shape[x.ndim - ndim :])


def _channel_shape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def group_norm(x, groups, weight, bias, eps):
    """x: (batch, channels, *spatial)."""
    x = f64(x)
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    g = (g - g.mean(2, keepdims=True)) / np.sqrt(g.var(2, keepdims=True) + eps)
    return _affine(g.reshape(x.shape), weight, bias, _channel_shape(x))


def instance_norm(x, weight, bias, eps):
    return group_norm(x, x.shape[1], weight, bias, eps)


def batch_norm(x, weight, bias, eps):
    """x: (batch, channels, *spatial). Returns y, batch mean, biased batch variance."""
    x = f64(x)
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axes)
    var = x.var(axes)
    shape = _channel_shape(x)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return _affine(y, weight, bias, shape), mean, var


def weight_standardize(w, eps):
    w = f64(w)
    rows = w.reshape(w.shape[0], -1)
    rows = (rows - rows.mean(1, keepdims=True)) / np.sqrt(rows.var(1, keepdims=True) + eps)
    return rows.reshape(w.shape)


def spectral_norm(w):
    w = f64(w)
    return np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)[0]


def add_norm(norm, x, residual, weight, bias, eps):
    """`(y, h)` of a residual add then `norm` (`layer_norm` or `rms_norm`): `h` is the sum
    rounded to the residual's dtype, as an unfused add stores it, and `y` its norm."""
    h = (f64(x) + f64(residual)).astype(np.dtype(residual.dtype))
    return norm(h, weight, bias, eps), h


def modulate(y, scale, shift):
    """`y (*lead, *middle, dim) * (1 + scale) + shift`, `scale`/`shift` `(*lead, dim)`
    broadcast over the middle axes."""
    scale, shift = f64(scale), f64(shift)
    middle = y.ndim - scale.ndim
    index = (slice(None),) * (scale.ndim - 1) + (None,) * middle
    return y * (1 + scale[index]) + shift[index]


def masked_norm(x, mask, axes, weight, bias, eps, center=True):
    """Normalize over `axes` with statistics over the `True` elements of `mask` (broadcast to
    `x`) only; every element normalized; a slice with no `True` element gives its bias.
    `weight`/`bias` must broadcast against `x`."""
    x = f64(x)
    m = np.broadcast_to(np.asarray(mask, bool), x.shape)
    n = m.sum(axes, keepdims=True)
    safe = np.maximum(n, 1)
    xv = np.where(m, x, 0.0)
    mean = xv.sum(axes, keepdims=True) / safe if center else np.zeros_like(n, np.float64)
    var = (np.where(m, x - mean, 0.0) ** 2).sum(axes, keepdims=True) / safe
    y = np.where(n > 0, (x - mean) / np.sqrt(var + eps), 0.0)
    if weight is not None:
        y = y * f64(weight)
    if bias is not None:
        y = y + f64(bias)
    return y
