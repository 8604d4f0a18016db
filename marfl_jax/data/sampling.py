"""Drawing each iteration's mini-batches from the peers' index tables, inside jit."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def sample_batches(key: jax.Array, row: jax.Array, count: jax.Array, num_batches: int,
                   batch_size: int) -> jax.Array:
    """One peer's b mini-batches of one iteration, drawn without replacement.

    A random permutation of the peer's first `count` entries of `row` is read in order; when
    count < b·B it wraps around (draw i takes permutation entry i mod count), so an example repeats
    only after all of the peer's examples were drawn. Jittable with num_batches and batch_size
    static; `count` may be traced.

    Args:
      key: PRNG key for this peer and iteration.
      row: (L,) int32 the peer's row of the `PeerIndex` table.
      count: () int number of valid entries in row (0 <= count <= L).
      num_batches: b (static).
      batch_size: B (static).

    Returns:
      (num_batches, batch_size) int32 indices into the shared training array. With count == 0
      every index is row[0] (a valid index; the caller must mask the peer out).
    """
    num_slots = row.shape[0]
    count = jnp.asarray(count, jnp.int32)
    # Valid slots get uniform keys in [0, 1), padding slots 2, so an argsort puts a random
    # permutation of the valid slots first.
    sort_keys = jnp.where(jnp.arange(num_slots) < count,
                          jax.random.uniform(key, (num_slots,)), 2.0)
    permutation = jnp.argsort(sort_keys)
    draws = jnp.arange(num_batches * batch_size) % jnp.maximum(count, 1)
    return row[permutation[draws]].astype(jnp.int32).reshape(num_batches, batch_size)


def sample_peer_batches(keys: jax.Array, table: jax.Array, counts: jax.Array, num_batches: int,
                        batch_size: int) -> jax.Array:
    """`sample_batches` for every peer: keys (N,), table (N, L), counts (N,) -> (N, b, B) int32."""
    one_peer = functools.partial(sample_batches, num_batches=num_batches, batch_size=batch_size)
    return jax.vmap(one_peer)(keys, table, counts)
