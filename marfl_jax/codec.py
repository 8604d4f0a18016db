"""Message codecs: what a payload looks like on the wire (`--codec`).

A sender encodes each payload it sends (weights, momentum, DP's smoothed update, MKD's teacher
weights); receivers decode it. The simulation only needs the round trip `decode(encode(x))`,
what a receiver ends up with, and the exact encoded size:

* `float32`: as is (the paper's): 4n bytes for an n-value leaf, no error;
* `float16`: IEEE half: 2n bytes, error <= 2^-11 relative in the normal range (beyond 65504:
  inf);
* `bfloat16`: 2n bytes, error <= 2^-8 relative;
* `int8`: blockwise absmax, per block of `--codec_block` values one float32 scale
  s = max |x| / 127 and int8 q = round(x / s): n + 4 ceil(n / block) bytes, error <= s / 2.

Blocks run along each leaf's flattened values, per peer; a butterfly slice holds whole blocks
(`unit`), so a slice encoded on its own is the whole leaf's encoding restricted to it and the
slices' sizes add up to the leaf's. `CODECS` is a registry; a codec is a
`Codec(roundtrip, leaf_bytes)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from marfl_jax.registry import Registry

DEFAULT_BLOCK = 4096  # Values per int8 scale: 0.1 % of the bytes go to scales.


class Codec(NamedTuple):
    """roundtrip(x (N, ...) float32, block) -> the values a receiver decodes, per peer;
    leaf_bytes(n, block) -> exact encoded bytes of one n-value leaf; blockwise: values are
    encoded in blocks of `block` (elementwise otherwise)."""

    roundtrip: Callable[[jax.Array, int], jax.Array]
    leaf_bytes: Callable[[int, int], int]
    lossless: bool = False
    blockwise: bool = False

    def unit(self, block: int) -> int:
        """Values that must stay together when a payload is cut into slices."""
        return block if self.blockwise else 1


CODECS: Registry[Codec] = Registry("codec")


def _cast(dtype):
    return lambda x, block: x.astype(dtype).astype(x.dtype)


def int8_blockwise(x: jax.Array, block: int) -> jax.Array:
    """Blockwise absmax int8 round trip of each peer's leaf. x: (N, ...) -> same shape."""
    num_peers = x.shape[0]
    flat = x.reshape(num_peers, -1)
    size = flat.shape[1]
    blocks = -(-size // block)
    padded = jnp.pad(flat, ((0, 0), (0, blocks * block - size))).reshape(num_peers, blocks,
                                                                          block)
    scale = jnp.max(jnp.abs(padded), axis=-1, keepdims=True) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(padded / safe), -127, 127)
    decoded = (q * safe).reshape(num_peers, blocks * block)[:, :size]
    return decoded.reshape(x.shape).astype(x.dtype)


CODECS.register("float32", Codec(lambda x, block: x, lambda n, block: 4 * n, lossless=True))
CODECS.register("float16", Codec(_cast(jnp.float16), lambda n, block: 2 * n))
CODECS.register("bfloat16", Codec(_cast(jnp.bfloat16), lambda n, block: 2 * n))
CODECS.register("int8", Codec(int8_blockwise, lambda n, block: n + 4 * math.ceil(n / block),
                              blockwise=True))


def tree_bytes(codec: Codec, tree, block: int = DEFAULT_BLOCK) -> int:
    """Encoded bytes of one payload (a pytree of one peer's arrays or ShapeDtypeStructs)."""
    return sum(codec.leaf_bytes(math.prod(leaf.shape), block)
               for leaf in jax.tree.leaves(tree))


def roundtrip_tree(codec: Codec, tree, block: int = DEFAULT_BLOCK):
    """What receivers decode of every peer's floating leaves (peer axis first); others as is."""
    if codec.lossless:
        return tree
    return jax.tree.map(lambda x: codec.roundtrip(x, block)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
