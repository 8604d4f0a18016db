"""Aggregation algorithms: each is a schedule of group assignments plus a wire-cost model.

`Algorithm.schedule(present (N,) bool) -> (G, N) int32` group ids (-1 = absent) for one
iteration's mixing rounds (runs inside jit); `Algorithm.wire` names the cost model in
`marfl_jax.comm.WIRE_MODELS` that turns the resulting group sizes into exact bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from marfl_jax.algorithms import marfl


class Algorithm(NamedTuple):
    name: str
    num_rounds: int
    num_groups: int
    schedule: Callable[[jax.Array], jax.Array]
    wire: str
    payloads_per_message: int
    exact: bool  # Full participation ends every iteration at the exact global mean.


def make_algorithm(config) -> Algorithm:
    """The algorithm named by `config.algorithm`, for `config.num_peers` peers."""
    if config.algorithm == "marfl":
        rule = marfl.authors_key_rule(config.num_peers, config.group_size, config.key_dim)
        rounds = config.num_rounds
        return Algorithm(
            name="marfl",
            num_rounds=rounds,
            num_groups=rule.num_groups,
            schedule=lambda present: marfl.moshpit_schedule(present, rule, rounds),
            wire=config.wire,
            payloads_per_message=2,
            exact=rule.exact and rounds >= config.key_dim,
        )
    raise ValueError(f"--algorithm={config.algorithm!r} is not allowed; choose one of: marfl")
