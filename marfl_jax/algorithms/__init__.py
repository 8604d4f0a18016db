"""Aggregation algorithms: each is a schedule of group assignments plus one wire.

`Algorithm.schedule(present (G, N) bool, key) -> (G, N) int32` gives the group ids
(-1 = absent) of one iteration's mixing rounds from each round's present peers (inside jit);
`Algorithm.wire` is how its groups exchange messages, one `marfl_jax.comm.Wire` (a name in
`marfl_jax.comm.WIRE_MODELS`, or the object): the bytes the ledger counts, the seconds the
clock charges and how coded copies are combined, all from that one wire. Every algorithm
averages the same state (weights and momentum).

| algorithm | rounds G | groups | wire |
|---|---|---|---|
| marfl  | key_dim (or --rounds) | Moshpit keys (authors or mixed radix) | --wire (allgather) |
| fedavg | 1 | all present peers | star (server) |
| arfl   | 1 | all present peers | allgather (full mesh) |
| rdfl   | 1 | ring arcs between absent peers | relay (allgather's bytes, timed hop by hop) |
| gossip | --rounds (default 1) | random pairs | allgather (pairs) |

Adding one is a factory `(settings: Settings) -> Algorithm` registered in `ALGORITHMS`;
`--algorithm=NAME` then selects it everywhere (see docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from marfl_jax import clock, comm, mixing
from marfl_jax.algorithms import baselines, marfl
from marfl_jax.registry import Registry


class Algorithm(NamedTuple):
    """One aggregation algorithm for a given N.

    Attributes:
      name: its --algorithm value.
      num_rounds: G, mixing rounds per iteration.
      num_groups: static bound on the group ids the schedule returns.
      schedule: (present (G, N) bool, key) -> (G, N) int32 group ids, -1 = absent.
      wire: how groups exchange messages: a name in `marfl_jax.comm.WIRE_MODELS` or a
        `marfl_jax.comm.Wire` (bytes, seconds and the combine of coded copies).
      exact: full participation ends every iteration at the exact global mean.
      description: one line for the log.
      max_group_size: no group of any round has more members (under churn as drawn).
      grid: at full participation the rounds are axes of this grid (`mixing.Grid`): then they
        run as reshape-and-mean, without a scatter. None: always segment means.
      metadata_record_bytes: bytes each present peer announces per round besides its messages
        (MAR-FL: its group key in the DHT), counted apart as metadata.
      barriers_per_round: coordination barriers the clock charges per round.
      group_keys: groups come from Moshpit keys (--schedule, --group_size and --key_dim apply).
      key_rule: the Moshpit key rule (`marfl.KeyRule`) an asynchronous run matches peers with;
        None: any ready peers meet.
    """

    name: str
    num_rounds: int
    num_groups: int
    schedule: Callable[[jax.Array, jax.Array], jax.Array]
    wire: str | comm.Wire
    exact: bool
    description: str
    max_group_size: int
    grid: mixing.Grid | None = None
    metadata_record_bytes: int = 0
    barriers_per_round: int = clock.BASELINE_BARRIERS_PER_ROUND
    group_keys: bool = False
    key_rule: marfl.KeyRule | None = None


ALGORITHMS: Registry[Callable[..., Algorithm]] = Registry("algorithm")


class Settings(NamedTuple):
    """What an algorithm's factory reads (the flags of the same names); factories receive
    these, not the run's Config."""

    algorithm: str
    num_peers: int
    group_size: int = 4
    key_dim: int = 3
    rounds: int = 0
    schedule: str = "authors"
    wire: str = "allgather"


def make_algorithm(settings: Settings) -> Algorithm:
    """The algorithm registered as `settings.algorithm`, for `settings.num_peers` peers (a
    Config's: `config.settings(Settings)`)."""
    return ALGORITHMS.get(settings.algorithm)(settings)


def _one_group(num_peers: int) -> mixing.Grid:
    return mixing.Grid((num_peers,), (0,))


@ALGORITHMS.register("marfl")
def moshpit(settings: Settings) -> Algorithm:
    """MAR-FL: Moshpit group keys (the authors' rule, or an exact mixed-radix grid)."""
    n = settings.num_peers
    if settings.schedule == "mixed_radix":
        radices = marfl.mixed_radix_factors(n, settings.key_dim)
        rule = marfl.mixed_radix_key_rule(n, radices)
        description = f"Moshpit keys on a mixed-radix {'x'.join(map(str, radices))} grid"
    else:
        rule = marfl.authors_key_rule(n, settings.group_size, settings.key_dim)
        description = ("Moshpit keys on a perfect grid" if rule.exact_rounds
                       else "Moshpit keys, the authors' buckets (approximate)")
    rounds = max(settings.rounds or rule.exact_rounds or settings.key_dim, 1)
    if settings.schedule == "mixed_radix":
        rule_radices = radices
    elif n == settings.group_size ** settings.key_dim:
        rule_radices = (settings.group_size,) * settings.key_dim
    else:
        rule_radices = (n,)  # Buckets: a grid only when one bucket holds everyone.
    full = marfl.full_schedule(rule, rounds)  # NumPy: validate() starts no backend.
    return Algorithm(
        "marfl", rounds, rule.num_groups,
        lambda present, _key: marfl.moshpit_schedule(present, rule), settings.wire,
        exact=bool(rule.exact_rounds) and rounds >= rule.exact_rounds,
        description=description, max_group_size=min(n, rule.max_group_size or n),
        grid=mixing.grid_of(full, rule_radices), metadata_record_bytes=comm.DHT_RECORD_BYTES,
        barriers_per_round=clock.MARFL_BARRIERS_PER_ROUND, group_keys=True, key_rule=rule)


@ALGORITHMS.register("fedavg")
def fedavg(settings: Settings) -> Algorithm:
    """FedAvg: one group of all present peers, through a server."""
    return Algorithm("fedavg", 1, 1, lambda present, _key: baselines.one_group(present), "star",
                     exact=True, description="one group of all peers, star",
                     max_group_size=settings.num_peers, grid=_one_group(settings.num_peers))


@ALGORITHMS.register("arfl")
def all_reduce(settings: Settings) -> Algorithm:
    """AR-FL: one group of all present peers, full mesh."""
    return Algorithm("arfl", 1, 1, lambda present, _key: baselines.one_group(present),
                     "allgather", exact=True, description="one group of all peers, allgather",
                     max_group_size=settings.num_peers, grid=_one_group(settings.num_peers))


@ALGORITHMS.register("rdfl")
def ring(settings: Settings) -> Algorithm:
    """RDFL: the ring, split into arcs at absent peers; every model relayed around its arc."""
    n = settings.num_peers
    return Algorithm("rdfl", 1, n, lambda present, _key: jax.vmap(baselines.ring_arcs)(present),
                     "relay", exact=True, description="ring relay", max_group_size=n,
                     grid=_one_group(n))  # Everyone present: one closed ring.


@ALGORITHMS.register("gossip")
def gossip(settings: Settings) -> Algorithm:
    """Gossip: --rounds (default 1) rounds of random pairs of present peers."""
    n = settings.num_peers
    return Algorithm("gossip", settings.rounds or 1, n // 2 + 1, baselines.random_pairs,
                     "allgather", exact=n <= 2, description="random pairs",
                     max_group_size=min(n, 2))
