"""Convolution and pooling lowerings the CNN can use, tested against lax/flax.

Convolutions (`CONV_IMPLS`; NHWC / HWIO, VALID, stride 1, no bias): `gather` (the default: im2col
as one XLA gather with a col2im custom VJP, then one matmul), `shift_concat` (im2col by shifted
slices + concatenate, one matmul) and `lax` (XLA's convolution, the natural choice on GPUs).
`ConvParams` declares a conv's kernel and bias exactly as nn.Conv does, so the params tree does not
depend on the lowering. `max_pool_2x2`'s custom VJP gives nn.max_pool's gradient, ties included.
Measurements: benchmarks/RESULTS.md, "CNN convolution lowering"; the lowerings tried and not kept:
benchmarks/conv_variants.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def check_choice(value: str, allowed: Iterable[str], what: str) -> None:
    """ValueError naming `what` and the allowed values unless `value` is one of them."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


# --------------------------------------------------------------------------------------------
# im2col: patches of a VALID, stride-1 kh x kw window, features ordered (i, j, c) like HWIO.
# --------------------------------------------------------------------------------------------


def im2col_slices(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """(B, H, W, C) -> (B, Ho, Wo, kh*kw*C) by kh*kw shifted slices + one concatenate."""
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1)


def _im2col_gather_fwd_impl(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """(B, H, W, C) -> (B, Ho, Wo, kh*kw*C) as ONE gather of (kh, kw*C) windows.

    With the (W, C) axes flattened, the window of output pixel (h, w) is kh contiguous runs of
    kw*C floats starting at rows h..h+kh-1, offset w*C: a single XLA gather whose slices are
    contiguous, which XLA:CPU emits as one loop fusion (producers such as bias + ReLU fuse in).
    """
    b, h, w, c = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    xf = x.reshape(b, h, w * c)
    starts = np.stack(np.meshgrid(np.arange(ho), np.arange(wo) * c, indexing="ij"), axis=-1)
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(0, 3, 4), collapsed_slice_dims=(), start_index_map=(1, 2)
    )
    p = lax.gather(
        xf,
        jnp.asarray(starts, jnp.int32),
        dnums,
        slice_sizes=(b, kh, kw * c),
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return p.reshape(b, ho, wo, kh * kw * c)


def col2im(dp: jax.Array, kh: int, kw: int) -> jax.Array:
    """Adjoint of im2col: (B, Ho, Wo, kh*kw*C) -> (B, Ho+kh-1, Wo+kw-1, C) (sum of pads)."""
    c = dp.shape[-1] // (kh * kw)
    out = None
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            term = jnp.pad(
                dp[..., k * c : (k + 1) * c], ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0))
            )
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def im2col_gather(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """Patches (B, Ho, Wo, kh*kw*C) of x (B, H, W, C); gather forward, pad-sum backward.

    The custom VJP replaces the gather's transpose (an XLA scatter-add, slow on CPU) by the
    fused sum of kh*kw padded slices.
    """
    return _im2col_gather_fwd_impl(x, kh, kw)


def _im2col_gather_fwd(x, kh, kw):
    return _im2col_gather_fwd_impl(x, kh, kw), None


def _im2col_gather_bwd(kh, kw, _, dp):
    return (col2im(dp, kh, kw),)


im2col_gather.defvjp(_im2col_gather_fwd, _im2col_gather_bwd)


# --------------------------------------------------------------------------------------------
# Convolution lowerings: (B, H, W, Cin), (kh, kw, Cin, Cout) -> (B, H-kh+1, W-kw+1, Cout).
# --------------------------------------------------------------------------------------------


def conv_gather(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """im2col as one gather (`im2col_gather`), then one matmul with K = kh*kw*Cin."""
    kh, kw, cin, cout = kernel.shape
    return jnp.dot(im2col_gather(x, kh, kw), kernel.reshape(kh * kw * cin, cout))


def conv_shift_concat(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """im2col by kh*kw shifted slices + concatenate (`im2col_slices`), then one matmul."""
    kh, kw, cin, cout = kernel.shape
    return jnp.dot(im2col_slices(x, kh, kw), kernel.reshape(kh * kw * cin, cout))


def conv_lax(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's convolution, `lax.conv_general_dilated` (vmapped over peers: a grouped one)."""
    return lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


CONV_LOWERINGS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "gather": conv_gather,
    "shift_concat": conv_shift_concat,
    "lax": conv_lax,
}
CONV_IMPLS = tuple(CONV_LOWERINGS)
DEFAULT_CONV_IMPL = "gather"


def conv_valid(x: jax.Array, kernel: jax.Array, impl: str = DEFAULT_CONV_IMPL) -> jax.Array:
    """VALID, stride-1 2-D convolution without bias, NHWC / HWIO.

    Args:
      x: (B, H, W, Cin) float32.
      kernel: (kh, kw, Cin, Cout).
      impl: one of CONV_IMPLS.
    Returns:
      (B, H-kh+1, W-kw+1, Cout).
    """
    check_choice(impl, CONV_IMPLS, "conv_impl")
    return CONV_LOWERINGS[impl](x, kernel)


class ConvParams(nn.Module):
    """Declares a 3x3 conv's parameters exactly as nn.Conv does: kernel (3,3,Cin,Cout), bias."""

    features: int

    @nn.compact
    def __call__(self, cin: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, cin, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return kernel, bias


# --------------------------------------------------------------------------------------------
# 2x2 max pool, stride 2, VALID: (B, H, W, C) -> (B, H//2, W//2, C); H, W even.
# --------------------------------------------------------------------------------------------


def subgrid_max(x: jax.Array) -> jax.Array:
    """The pool's forward: max of the four strided sub-grids (autodiff splits ties evenly)."""
    return jnp.maximum(
        jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
        jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]),
    )


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pool (`subgrid_max`) whose gradient goes to each window's first maximum.

    The same gradient as nn.max_pool's (XLA select_and_scatter), ties included, in one fused
    elementwise pass.
    """
    return subgrid_max(x)


def _max_pool_2x2_fwd(x):
    y = subgrid_max(x)
    return y, (x, y)


def _max_pool_2x2_bwd(res, g):
    # The gradient goes to the FIRST maximum of each window in row-major order -- the rule of
    # XLA's select_and_scatter, i.e. of nn.max_pool's gradient -- computed as one elementwise
    # pass over the window-shaped input (no scatter, no tie-count reduction).
    x, y = res
    b, h, w, c = x.shape
    xr = x.reshape(b, h // 2, 2, w // 2, 2, c)
    yb = y[:, :, None, :, None, :]
    e00 = xr[:, :, 0:1, :, 0:1, :] == yb
    e01 = xr[:, :, 0:1, :, 1:2, :] == yb
    e10 = xr[:, :, 1:2, :, 0:1, :] == yb
    row = lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 2, 1), 2)
    col = lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 2, 1), 4)
    earlier = jnp.where(
        row == 0,
        (col == 1) & e00,
        e00 | e01 | ((col == 1) & e10),
    )
    dx = jnp.where((xr == yb) & ~earlier, g[:, :, None, :, None, :], 0.0)
    return (dx.astype(x.dtype).reshape(b, h, w, c),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)
