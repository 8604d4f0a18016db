"""The CNN lowerings measured by benchmarks/conv_lowering.py but not offered to runs.

`VariantCNN` is `marfl_jax.models.CNN` with more choices of `conv_impl` (VARIANT_CONV_IMPLS) and a
`pool_impl` (POOL_IMPLS), all on the same params tree (and the same initial values) as the CNN:

  shift_sum     9 accumulated matmuls with K=Cin (elementwise FMAs when Cin=1).
  lax_patches   lax.conv_general_dilated_patches + matmul (the patches are a convolution too).
  fused         conv1 folded into conv2's im2col: one K=25 matmul writes conv2's patches
                directly (no col2im for conv1), at +21 % FLOPs.
  flax          nn.Conv layers, bias and ReLU before pooling (the others pool first).

Pools: 'first_max' (the CNN's), 'slices' (the same forward, autodiff gradient: ties split
evenly), 'reshape' (reshape + max, ties split evenly), 'reduce_window' (nn.max_pool).
`VariantCNN(conv_impl="flax", pool_impl="reduce_window")` is the stock flax network. Results:
benchmarks/RESULTS.md, "CNN convolution lowering". tests/test_layers.py and tests/test_models.py
check every variant against lax / stock flax.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from marfl_jax import layers, models


def conv_shift_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """kh*kw accumulated matmuls with K = Cin (an elementwise FMA when Cin == 1)."""
    kh, kw, cin, _ = kernel.shape
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            s = x[:, i : i + ho, j : j + wo, :]
            t = s * kernel[i, j, 0] if cin == 1 else jnp.dot(s, kernel[i, j])
            y = t if y is None else y + t
    return y


def conv_lax_patches(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """lax.conv_general_dilated_patches + one matmul."""
    kh, kw, cin, cout = kernel.shape
    # Features come out channel-major (c, i, j): reorder the kernel to match.
    patches = lax.conv_general_dilated_patches(
        x, (kh, kw), (1, 1), "VALID", dimension_numbers=("NHWC", "OIHW", "NHWC")
    )
    return jnp.dot(patches, jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin * kh * kw, cout))


# Single-convolution lowerings: (B, H, W, Cin), (kh, kw, Cin, Cout) -> (B, Ho, Wo, Cout).
CONV_LOWERINGS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    **layers.CONV_LOWERINGS,
    "shift_sum": conv_shift_sum,
    "lax_patches": conv_lax_patches,
}
# 'fused' and 'flax' are whole-conv-block formulations (VariantCNN.conv_block).
VARIANT_CONV_IMPLS = tuple(CONV_LOWERINGS) + ("fused", "flax")


def pool_reshape(x: jax.Array) -> jax.Array:
    """2x2 max pool as reshape + max: (B, H, W, C) -> (B, H//2, W//2, C)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def pool_reduce_window(x: jax.Array) -> jax.Array:
    """flax nn.max_pool (XLA reduce_window / select_and_scatter, slow vmapped on CPU)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


POOLS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "first_max": layers.max_pool_2x2,
    "slices": layers.subgrid_max,
    "reshape": pool_reshape,
    "reduce_window": pool_reduce_window,
}
POOL_IMPLS = tuple(POOLS)
DEFAULT_POOL_IMPL = "first_max"


def fused_conv1_matrix(k1: jax.Array) -> jax.Array:
    """conv1 kernel (3,3,1,C1) -> (25, 9*C1): maps a 5x5 input window to conv1's 3x3 outputs."""
    t = np.zeros((5, 5, 3, 3, 3, 3), np.float32)
    for i in range(3):
        for j in range(3):
            for a in range(3):
                for b in range(3):
                    t[i + a, j + b, i, j, a, b] = 1.0
    c1 = k1.shape[-1]
    return jnp.einsum("uvijab,abc->uvijc", t, k1[:, :, 0, :]).reshape(25, 9 * c1)


class VariantCNN(models.CNN):
    """models.CNN with conv_impl one of VARIANT_CONV_IMPLS and pool_impl one of POOL_IMPLS.

    Same input, output and params tree as models.CNN.
    """

    pool_impl: str = DEFAULT_POOL_IMPL

    def conv_block(self, x: jax.Array) -> jax.Array:
        """(B, 28, 28, Cin) -> (B, 12, 12, 64), as models.CNN.conv_block."""
        layers.check_choice(self.conv_impl, VARIANT_CONV_IMPLS, "conv_impl")
        layers.check_choice(self.pool_impl, POOL_IMPLS, "pool_impl")
        pool = POOLS[self.pool_impl]
        if self.conv_impl == "flax":
            # Stock flax: bias inside the conv, ReLU, then pool.
            x = nn.relu(nn.Conv(32, (3, 3), padding="VALID", name="conv1")(x))
            x = nn.relu(nn.Conv(64, (3, 3), padding="VALID", name="conv2")(x))
            return pool(x)
        k1, b1 = layers.ConvParams(32, name="conv1")(x.shape[-1])
        k2, b2 = layers.ConvParams(64, name="conv2")(32)
        if self.conv_impl == "fused":
            if x.shape[-1] != 1:
                raise ValueError(f"conv_impl='fused' needs 1 input channel; got {x.shape}")
            # conv1 folded into conv2's im2col: one K=25 matmul writes conv2's patches.
            p2 = nn.relu(
                jnp.dot(layers.im2col_gather(x, 5, 5), fused_conv1_matrix(k1)) + jnp.tile(b1, 9)
            )
            z = jnp.dot(p2, k2.reshape(9 * 32, 64))
        else:
            conv = CONV_LOWERINGS[self.conv_impl]
            z = conv(nn.relu(conv(x, k1) + b1), k2)
        # Pool first, then conv2's bias and ReLU (exact: both maps are monotone).
        return nn.relu(pool(z) + b2)
