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

`mixed_radix_key_rule` is this project's exact alternative for any N that factors into small group
sizes, e.g. 100 = 4*5*5 or 96 = 4*4*6: peer p's position is written in mixed radix
(m_0, ..., m_{k-1}); round r groups the peers whose positions agree in every digit but digit r,
and the member's chunk index becomes its new digit r. At full participation k rounds average
along each axis once: the exact global mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from marfl_jax import mixing

SCHEDULES = ("authors", "mixed_radix")  # --schedule: authors_key_rule, mixed_radix_key_rule.


class KeyRule(NamedTuple):
    """A Moshpit key schedule. Each peer carries an integer key; in round r its group id is
    `group_of(keys (N,), r) -> (N,)` in [0, num_groups), and after the round its key becomes
    `next_key(keys (N,), chunk_index (N,), r) -> (N,)`."""

    num_groups: int
    initial_keys: np.ndarray  # (N,) int32.
    next_key: Callable[[jax.Array, jax.Array, int], jax.Array]
    exact_rounds: int | None  # Rounds after which full participation gives the exact mean.
    group_of: Callable[[jax.Array, int], jax.Array] = lambda keys, _round: keys
    # A bound on any group's size whenever a peer that leaves an iteration's rounds does not
    # return before the next iteration (as churn.py draws it); None = no bound but N.
    max_group_size: int | None = None


def authors_key_rule(num_peers: int, group_size: int, key_dim: int) -> KeyRule:
    """The authors' key rule for N peers, group size M and key dimension d."""
    initial = (np.arange(num_peers) // group_size).astype(np.int32)
    if num_peers == group_size**key_dim:
        num_groups = group_size ** (key_dim - 1)

        def next_grid_key(keys, chunk, _round):
            return (keys * group_size + chunk) % num_groups

        # A group of round r + 1 draws at most one member (the one of rank c) from each of the M
        # groups whose keys differ only in the digit shifted out, so no group exceeds M.
        return KeyRule(num_groups, initial, next_grid_key, exact_rounds=key_dim,
                       max_group_size=group_size)

    num_buckets = math.ceil(num_peers / group_size)
    alphas = _authors_alphas(num_peers, group_size, key_dim, num_buckets)

    def next_bucket(keys, chunk, round_index):
        return (keys + alphas[round_index % len(alphas)] * chunk) % num_buckets

    # Bucket k of the next round receives the member of rank c from bucket k - alpha*c, c < M.
    # With alpha coprime to the bucket count and M <= buckets these sources are distinct, so
    # (by induction from the initial buckets of <= M) no group exceeds M; else no bound but N.
    bounded = num_buckets >= group_size and all(math.gcd(a, num_buckets) == 1 for a in alphas)
    return KeyRule(num_buckets, initial, next_bucket,
                   exact_rounds=1 if num_buckets == 1 else None,
                   max_group_size=group_size if bounded else None)


def _authors_alphas(num_peers, group_size, key_dim, num_buckets) -> tuple[int, ...]:
    hard_coded = {(4, 3, 125): (1, 5), (3, 4, 125): (1, 5, 11)}
    if (group_size, key_dim, num_peers) in hard_coded:
        return hard_coded[(group_size, key_dim, num_peers)]
    alpha = 1
    while math.gcd(alpha, num_buckets) != 1:
        alpha += 2
    return (alpha,)


def moshpit_schedule(present: jax.Array, rule: KeyRule) -> jax.Array:
    """Group ids of every round of one iteration.

    Args:
      present: (G, N) bool, the peers taking part in each round (a peer absent from a round
        neither averages nor counts in its group's chunk indices).
      rule: the key schedule.
    Returns:
      (G, N) int32 group ids, -1 for absent peers.
    """
    keys = jnp.asarray(rule.initial_keys)
    rounds = []
    for r in range(present.shape[0]):
        ids = jnp.where(present[r], rule.group_of(keys, r), mixing.ABSENT).astype(jnp.int32)
        rounds.append(ids)
        keys = rule.next_key(keys, mixing.rank_in_group(ids, rule.num_groups), r)
    return jnp.stack(rounds)


def full_schedule(rule: KeyRule, num_rounds: int) -> np.ndarray:
    """`moshpit_schedule` at full participation, in NumPy: (num_rounds, N) int32 group ids.

    Built without jax (the key rules are integer arithmetic that NumPy runs as well), so an
    algorithm's factory, and with it `Config.validate()`, never starts a jax backend."""
    keys = np.asarray(rule.initial_keys, np.int32)
    peers = np.arange(keys.size)
    rounds = []
    for r in range(num_rounds):
        ids = np.asarray(rule.group_of(keys, r), np.int32)
        rounds.append(ids)
        # Rank among the group's members sorted by peer id (mixing.rank_in_group, all present).
        order = np.argsort(ids, kind="stable")
        sizes = np.bincount(ids, minlength=rule.num_groups)
        starts = np.cumsum(sizes) - sizes
        rank = np.empty_like(ids)
        rank[order] = (peers - starts[ids[order]]).astype(np.int32)
        keys = np.asarray(rule.next_key(keys, rank, r), np.int32)
    return np.stack(rounds) if rounds else np.zeros((0, keys.size), np.int32)


def grid_key_rule(radices: tuple[int, ...], initial_positions: np.ndarray) -> KeyRule:
    """Moshpit All-Reduce on a mixed-radix grid (Ryabinin et al., 2021, generalized to mixed
    radices). Keys are grid positions in [0, prod(radices)). Round r uses axis a = r mod k: peers
    whose positions agree in every digit but digit a form a group, and the chunk index (rank among
    present members, mod the radix) becomes the new digit a.

    Args:
      radices: (m_0, ..., m_{k-1}) group sizes along the grid's axes.
      initial_positions: (N,) each peer's starting cell (the peer id for an exact grid; random
        cells reproduce the Moshpit SGD paper's averaging experiment).
    """
    strides = np.cumprod((1,) + tuple(radices[:-1]))

    def digit(keys, axis):
        return (keys // int(strides[axis])) % radices[axis]

    def group_of(keys, r):
        axis = r % len(radices)
        return keys - digit(keys, axis) * int(strides[axis])

    def next_key(keys, chunk, r):
        axis = r % len(radices)
        return group_of(keys, r) + (chunk % radices[axis]) * int(strides[axis])

    positions = np.asarray(initial_positions, np.int32)
    # Distinct cells stay distinct (a group of <= m members takes distinct chunk indices), and a
    # group is one line of m cells; random cells may share one, so then no bound but N.
    distinct = np.unique(positions).size == positions.size
    return KeyRule(math.prod(radices), positions, next_key, exact_rounds=len(radices),
                   group_of=group_of, max_group_size=max(radices) if distinct else None)


def mixed_radix_key_rule(num_peers: int, radices: tuple[int, ...]) -> KeyRule:
    """Exact schedule for N = prod(radices) peers: peer p starts in cell p, so at full
    participation round r averages along axis r and k rounds give the exact global mean."""
    if math.prod(radices) != num_peers:
        raise ValueError(f"radices {radices} do not multiply to {num_peers} peers")
    return grid_key_rule(radices, np.arange(num_peers))


def mixed_radix_factors(num_peers: int, num_rounds: int) -> tuple[int, ...]:
    """Factors num_peers into at most `num_rounds` group sizes >= 2 as balanced as possible
    (smallest largest factor, then fewest bytes: smallest sum of (m - 1)); e.g. 100 with 3 rounds
    -> (4, 5, 5), 96 -> (4, 4, 6). A prime N gives (N,); N = 1 gives (1,): one group of one."""
    best: tuple[int, ...] | None = None

    def better(a, b):
        return b is None or (max(a), sum(a) - len(a)) < (max(b), sum(b) - len(b))

    def search(rest: int, smallest: int, slots: int, chosen: tuple[int, ...]):
        nonlocal best
        if rest == 1:
            if chosen and better(chosen, best):
                best = chosen
            return
        if slots == 1:
            if rest >= smallest:
                search(1, rest, 0, chosen + (rest,))
            return
        for f in range(smallest, math.isqrt(rest) + 1):
            if rest % f == 0:
                search(rest // f, f, slots - 1, chosen + (f,))
        search(1, rest, 0, chosen + (rest,))  # The rest as one factor.

    if num_peers == 1:
        return (1,)
    search(num_peers, 2, max(1, num_rounds), ())
    return best
