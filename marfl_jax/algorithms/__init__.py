"""Aggregation algorithms: each is a schedule of group assignments plus a wire-cost model.

`Algorithm.schedule(present (G, N) bool, key) -> (G, N) int32` gives the group ids
(-1 = absent) of one iteration's mixing rounds from each round's present peers (inside jit);
`Algorithm.wire` names the cost model in `marfl_jax.comm.WIRE_MODELS` that turns the resulting
group sizes into exact bytes. Every
algorithm averages the same state (weights and momentum), so all of them send
`payloads_per_message = 2` model-sized tensors per message.

| algorithm | rounds G | groups | wire |
|---|---|---|---|
| marfl  | key_dim (or --rounds) | Moshpit keys (authors or mixed radix) | allgather, butterfly |
| fedavg | 1 | all present peers | star (server) |
| arfl   | 1 | all present peers | allgather (full mesh) |
| rdfl   | 1 | ring arcs between absent peers | allgather (relay around the arc) |
| gossip | --rounds (default 1) | random pairs | allgather (pairs) |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from marfl_jax.algorithms import baselines, marfl

ALGORITHMS = ("marfl", "fedavg", "arfl", "rdfl", "gossip")


class Algorithm(NamedTuple):
    name: str
    num_rounds: int
    num_groups: int  # Static bound on group ids.
    schedule: Callable[[jax.Array, jax.Array], jax.Array]
    wire: str
    payloads_per_message: int
    exact: bool  # Full participation ends every iteration at the exact global mean.
    description: str
    max_group_size: int  # No group of any round has more members (under churn as drawn).


def make_algorithm(config) -> Algorithm:
    """The algorithm named by `config.algorithm`, for `config.num_peers` peers."""
    n = config.num_peers
    if config.algorithm == "marfl":
        if config.schedule == "mixed_radix":
            radices = marfl.mixed_radix_factors(n, config.key_dim)
            rule = marfl.mixed_radix_key_rule(n, radices)
            shape = "x".join(map(str, radices)) or "1"
            description = f"Moshpit keys on a mixed-radix {shape} grid"
        else:
            rule = marfl.authors_key_rule(n, config.group_size, config.key_dim)
            description = ("Moshpit keys on a perfect grid" if rule.exact_rounds
                           else "Moshpit keys, the authors' buckets (approximate)")
        rounds = config.rounds or rule.exact_rounds or config.key_dim
        rounds = max(rounds, 1)
        return Algorithm(
            "marfl", rounds, rule.num_groups,
            lambda present, _key: marfl.moshpit_schedule(present, rule),
            config.wire, 2, exact=bool(rule.exact_rounds) and rounds >= rule.exact_rounds,
            description=description, max_group_size=min(n, rule.max_group_size or n))
    if config.algorithm in ("fedavg", "arfl"):
        wire = "star" if config.algorithm == "fedavg" else "allgather"
        return Algorithm(config.algorithm, 1, 1, lambda present, _key: baselines.one_group(present),
                         wire, 2, exact=True, description=f"one group of all peers, {wire}",
                         max_group_size=n)
    if config.algorithm == "rdfl":
        return Algorithm("rdfl", 1, n,
                         lambda present, _key: jax.vmap(baselines.ring_arcs)(present),
                         "allgather", 2, exact=True, description="ring relay", max_group_size=n)
    if config.algorithm == "gossip":
        rounds = config.rounds or 1
        return Algorithm("gossip", rounds, n // 2 + 1,
                         baselines.random_pairs,
                         "allgather", 2, exact=n <= 2, description="random pairs",
                         max_group_size=min(n, 2))
    raise ValueError(f"--algorithm={config.algorithm!r} is not allowed; choose one of: "
                     + ", ".join(ALGORITHMS))
