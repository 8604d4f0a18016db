"""The baselines MAR-FL is compared with, as group schedules over the peer axis.

Each returns (G, N) int32 group ids for one iteration (-1 = absent peer); the wire that goes with
each (`marfl_jax.comm.Wire`) is named in `marfl_jax.algorithms.make_algorithm`.

* FedAvg: one group of all present peers, through a server (star).
* AR-FL: one group of all present peers, full-mesh all-to-all.
* RDFL: the ring of peers 0..N-1; every model is relayed around it until each peer has seen all.
  Absent peers break the ring into arcs, each of which averages on its own (the `relay` wire).
* Gossip: in each round, a random perfect matching of the present peers; pairs average.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marfl_jax import mixing


def one_group(present: jax.Array) -> jax.Array:
    """Every present peer in group 0. present (G, N) bool -> (G, N) int32."""
    return jnp.where(present, 0, mixing.ABSENT).astype(jnp.int32)


def ring_arcs(present: jax.Array) -> jax.Array:
    """Maximal runs of consecutive present peers on the ring 0..N-1 (wrapping around), numbered
    in order of their first peer; the run that wraps past N-1 joins the one at 0.
    present (N,) bool -> (N,) int32 arc ids, -1 for absent peers. With no absent peer: one arc.
    """
    previous = jnp.roll(present, 1)
    starts = present & ~previous  # Peers that follow an absent peer.
    num_arcs = starts.sum()
    # Peers before the first start (in index order) belong to the wrapping arc, the last one.
    arc = jnp.cumsum(starts) - 1
    arc = jnp.where(arc < 0, num_arcs - 1, arc)
    arc = jnp.where(num_arcs == 0, 0, arc)  # Everyone present: a single closed ring.
    return jnp.where(present, arc, mixing.ABSENT).astype(jnp.int32)


def random_pairs(present: jax.Array, key: jax.Array) -> jax.Array:
    """Gossip: each round pairs the present peers by a fresh random permutation; an odd peer out
    keeps its value. present (G, N) bool -> (G, N) int32 pair ids in [0, N//2 + 1)."""
    num_peers = present.shape[1]

    def one_round(present, round_key):
        # Present peers first, in random order; pair neighbours in that order.
        priority = jnp.where(present, jax.random.uniform(round_key, (num_peers,)), 2.0)
        order = jnp.argsort(priority)
        position = jnp.zeros(num_peers, jnp.int32).at[order].set(jnp.arange(num_peers))
        pair = position // 2
        return jnp.where(present, pair, mixing.ABSENT).astype(jnp.int32)

    return jax.vmap(one_round)(present, jax.random.split(key, present.shape[0]))
