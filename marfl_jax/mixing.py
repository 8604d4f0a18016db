"""Group averaging over the peer axis.

Every per-peer quantity is a pytree whose leaves have a leading peer axis of size N. A *mixing
round* is described by one vector of group ids, shape (N,), int32: peers with the same id form a
group and each present peer's value is replaced by its group's mean; id -1 marks an absent peer,
whose value is left as it is. An aggregation algorithm is a schedule of such rounds, shape
(G, N) (see `marfl_jax.algorithms`).

The mean is a gather / segment-sum / gather-back: O(N * params) work and memory, never an N x N
mixing matrix (measured slower by 4x at N=1024, see DESIGN.md section 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ABSENT = -1


def group_sizes(group_ids: jax.Array, num_groups: int) -> jax.Array:
    """Members per group. group_ids: (N,) in [-1, num_groups). Returns (num_groups,) int32."""
    present = group_ids >= 0
    segment = jnp.where(present, group_ids, num_groups)
    sizes = jax.ops.segment_sum(present.astype(jnp.int32), segment, num_segments=num_groups + 1)
    return sizes[:num_groups]


def member_group_sizes(group_ids: jax.Array, num_groups: int) -> jax.Array:
    """Size of each peer's own group, 0 for absent peers. (N,) -> (N,) int32."""
    sizes = group_sizes(group_ids, num_groups)
    return jnp.where(group_ids >= 0, sizes[jnp.maximum(group_ids, 0)], 0)


def group_mean(tree, group_ids: jax.Array, num_groups: int):
    """Replaces each present peer's leaves by the mean over its group.

    Args:
      tree: pytree of arrays with leading peer axis N. Only floating-point leaves are averaged;
        integer leaves (e.g. optimizer step counts) are returned unchanged.
      group_ids: (N,) int32, values in [-1, num_groups); -1 = absent (kept as is).
      num_groups: static upper bound on the group ids.
    Returns:
      A pytree of the same structure, shapes and dtypes.
    """
    present = group_ids >= 0
    segment = jnp.where(present, group_ids, num_groups)  # Absent peers go to a discarded segment.
    sizes = jax.ops.segment_sum(present.astype(jnp.float32), segment, num_segments=num_groups + 1)
    inverse_sizes = 1.0 / jnp.maximum(sizes, 1.0)

    def mean_leaf(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        sums = jax.ops.segment_sum(x, segment, num_segments=num_groups + 1)
        scale = inverse_sizes.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        means = (sums * scale)[segment]
        keep = present.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(keep, means, x)

    return jax.tree.map(mean_leaf, tree)


def mix(tree, schedule: jax.Array, num_groups: int):
    """Applies the rounds of a schedule in order. schedule: (G, N) group ids; returns the tree."""
    for round_ids in schedule:  # G is small and static: unrolled.
        tree = group_mean(tree, round_ids, num_groups)
    return tree


def rank_in_group(group_ids: jax.Array, num_groups: int) -> jax.Array:
    """Each present peer's rank among its group's members sorted by peer id (the Moshpit chunk
    index); absent peers get 0. (N,) -> (N,) int32. O(N log N) via one stable sort."""
    num_peers = group_ids.shape[0]
    present = group_ids >= 0
    segment = jnp.where(present, group_ids, num_groups)
    order = jnp.argsort(segment, stable=True)  # Ties keep peer-id order.
    sizes = jax.ops.segment_sum(jnp.ones_like(segment), segment, num_segments=num_groups + 1)
    starts = jnp.cumsum(sizes) - sizes
    sorted_rank = jnp.arange(num_peers, dtype=jnp.int32) - starts[segment[order]]
    rank = jnp.zeros(num_peers, jnp.int32).at[order].set(sorted_rank.astype(jnp.int32))
    return jnp.where(present, rank, 0)


def consensus_distance(tree, present: jax.Array) -> jax.Array:
    """Mean over present peers of the squared distance of their parameters from the present peers'
    mean. tree leaves (N, ...); present (N,) bool. Returns a scalar float32 (0 if nobody)."""
    weights = present.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    total = jnp.float32(0.0)
    for x in jax.tree.leaves(tree):
        w = weights.reshape((-1,) + (1,) * (x.ndim - 1))
        mean = (x * w).sum(axis=0) / count
        total = total + (((x - mean) ** 2) * w).sum()
    return total / count
