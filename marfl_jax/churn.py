"""Who takes part in an iteration: partial participation, dropout and availability.

As the MAR-FL authors define it: floor(`update_fraction` * N) peers (in exact decimal arithmetic,
`peer_count`) are drawn to train and floor(`aggregate_fraction` * N) to aggregate (the same
set when the two are equal: both are prefixes of one random permutation); each aggregating peer
then drops out with probability `dropout` for the whole aggregation. Absent peers keep their model
and momentum.

Two churn models beyond the authors':
* `dropout_timing="mid"`: a dropping peer leaves after a uniformly random round r in [0, G): it
  takes part in rounds before r, and the groups of rounds >= r average without it.
* `availability="markov"`: each peer is on or off, a two-state Markov chain per peer that persists
  across iterations, with mean on-time `mean_on` and mean off-time `mean_off` iterations; an off
  peer neither trains nor aggregates.
All draws come from the iteration's key, so a run is a function of its seed.
"""

from __future__ import annotations

import fractions
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

DROPOUT_TIMINGS = ("before", "mid")
AVAILABILITY_MODELS = ("always", "markov")


def peer_count(fraction: float, num_peers: int) -> int:
    """floor(fraction * N) in exact decimal arithmetic: the authors' int(N * percent / 100), so
    0.29 of 100 peers is 29 (float int(0.29 * 100) would give 28)."""
    return math.floor(fractions.Fraction(repr(float(fraction))) * num_peers)


class ChurnModel(NamedTuple):
    update_fraction: float = 1.0
    aggregate_fraction: float = 1.0
    dropout: float = 0.0
    dropout_timing: str = "before"
    availability: str = "always"
    mean_on: float = 10.0
    mean_off: float = 2.0


class Participation(NamedTuple):
    updating: jax.Array  # (N,) bool: peers that train this iteration.
    present: jax.Array  # (G, N) bool: peers that take part in each aggregation round.


def initial_availability(key: jax.Array, num_peers: int, model: ChurnModel) -> jax.Array:
    """(N,) bool: everyone for `always`; the Markov chain's stationary draw for `markov`."""
    if model.availability == "always":
        return jnp.ones(num_peers, bool)
    on_probability = model.mean_on / (model.mean_on + model.mean_off)
    return jax.random.uniform(key, (num_peers,)) < on_probability


def next_availability(key: jax.Array, available: jax.Array, model: ChurnModel) -> jax.Array:
    """One step of each peer's on/off chain: on -> off w.p. 1/mean_on, off -> on w.p. 1/mean_off.
    (N,) bool -> (N,) bool."""
    if model.availability == "always":
        return available
    u = jax.random.uniform(key, available.shape)
    return jnp.where(available, u >= 1.0 / model.mean_on, u < 1.0 / model.mean_off)


def draw_participation(key: jax.Array, available: jax.Array, num_rounds: int,
                       model: ChurnModel) -> Participation:
    """This iteration's trainers and each round's aggregators.

    Args:
      key: the iteration's churn key.
      available: (N,) bool, peers that are on this iteration.
      num_rounds: G, the aggregation's rounds.
    """
    num_peers = available.shape[0]
    order_key, drop_key, round_key = jax.random.split(key, 3)
    # Rank of each peer in one random permutation: the first k are drawn.
    rank = jnp.argsort(jax.random.permutation(order_key, num_peers))
    updating = available & (rank < peer_count(model.update_fraction, num_peers))
    aggregating = available & (rank < peer_count(model.aggregate_fraction, num_peers))
    drops = aggregating & (jax.random.uniform(drop_key, (num_peers,)) < model.dropout)
    if model.dropout_timing == "before":
        leaves_at = jnp.where(drops, 0, num_rounds)
    else:
        leaves_at = jnp.where(drops, jax.random.randint(round_key, (num_peers,), 0, num_rounds),
                              num_rounds)
    present = aggregating[None] & (jnp.arange(num_rounds)[:, None] < leaves_at[None])
    return Participation(updating, present)
