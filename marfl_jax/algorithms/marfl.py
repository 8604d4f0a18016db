"""MAR-FL's group schedule: Moshpit group keys, as the paper's authors' code forms them.

Peer p's initial key is its d-1 most significant base-M digits, i.e. p // M. In each round the
present peers with equal keys form a group; a member's chunk index c is its rank in the group
sorted by peer id. Keys restart from the initial key every iteration.

* Perfect grid (N == M^d): the next key is the old key shifted left one digit with c appended,
  (key * M + c) mod M^(d-1). At full participation round r averages along one grid axis, so d
  rounds give every peer the exact global mean.
* Otherwise (the authors' buckets): key = bucket in [0, ceil(N/M)), next bucket =
  (bucket + alpha_r * c) mod ceil(N/M), with alpha = [1, 5] for (M, d, N) = (4, 3, 125),
  [1, 5, 11] for (3, 4, 125), and else the smallest odd number coprime with ceil(N/M). This
  averages only approximately.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from marfl_jax import mixing


class KeyRule(NamedTuple):
    """A Moshpit key schedule. `next_key(keys (N,), chunk_index (N,), round r) -> (N,)`."""

    num_groups: int
    initial_keys: np.ndarray  # (N,) int32.
    next_key: Callable[[jax.Array, jax.Array, int], jax.Array]
    exact: bool  # Whether full participation yields the exact global mean after d rounds.


def authors_key_rule(num_peers: int, group_size: int, key_dim: int) -> KeyRule:
    """The authors' key rule for N peers, group size M and key dimension d."""
    initial = (np.arange(num_peers) // group_size).astype(np.int32)
    if num_peers == group_size**key_dim:
        num_groups = group_size ** (key_dim - 1)

        def next_grid_key(keys, chunk, _round):
            return (keys * group_size + chunk) % num_groups

        return KeyRule(num_groups, initial, next_grid_key, exact=True)

    num_buckets = math.ceil(num_peers / group_size)
    alphas = _authors_alphas(num_peers, group_size, key_dim, num_buckets)

    def next_bucket(keys, chunk, round_index):
        return (keys + alphas[round_index % len(alphas)] * chunk) % num_buckets

    return KeyRule(num_buckets, initial, next_bucket, exact=num_buckets == 1)


def _authors_alphas(num_peers, group_size, key_dim, num_buckets) -> tuple[int, ...]:
    hard_coded = {(4, 3, 125): (1, 5), (3, 4, 125): (1, 5, 11)}
    if (group_size, key_dim, num_peers) in hard_coded:
        return hard_coded[(group_size, key_dim, num_peers)]
    alpha = 1
    while math.gcd(alpha, num_buckets) != 1:
        alpha += 2
    return (alpha,)


def moshpit_schedule(present: jax.Array, rule: KeyRule, num_rounds: int) -> jax.Array:
    """Group ids of every round of one iteration.

    Args:
      present: (N,) bool, the peers taking part in this aggregation.
      rule: the key schedule.
      num_rounds: G.
    Returns:
      (G, N) int32 group ids, -1 for absent peers.
    """
    keys = jnp.asarray(rule.initial_keys)
    rounds = []
    for r in range(num_rounds):
        ids = jnp.where(present, keys, mixing.ABSENT).astype(jnp.int32)
        rounds.append(ids)
        keys = rule.next_key(keys, mixing.rank_in_group(ids, rule.num_groups), r)
    return jnp.stack(rounds)
