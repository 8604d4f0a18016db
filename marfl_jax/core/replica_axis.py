"""R independent simulations of one run on a leading replica axis, as one jitted program.

    iteration(states (R, N, ...), keys (R,), data, inputs (R, ...)) -> (states, info (R, ...))

Replica r is the run of seed + r: its own initial model, iteration keys (churn, batches,
dropout, attackers' noise, MKD's teachers) and state, and, in `ReplicaInputs`, what the host
draws from the seed outside the keys: the peers' index tables of a seeded partition, the
attackers' pool and the network's links. Everything else (the model, the schedule's shape, the
rule, the codec, the data array) is shared. The replicas never interact: the iteration is
`jax.vmap` of the single run's over this axis, so replica r computes what a run with seed + r
computes (tests/test_replicas.py checks the rows).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from marfl_jax.core.iteration import Simulation, make_iteration
from marfl_jax.core.state import DeviceData


class ReplicaInputs(NamedTuple):
    """What differs between replicas besides the state and the keys (None: shared).

    Attributes:
      byzantine: (R, N) bool, each replica's attackers (`adversary.pool` of seed + r), or None.
      links: `clock.Links` with leaves (R, N), each replica's drawn links, or None.
    """

    byzantine: Any = None
    links: Any = None


AXIS = "replicas"  # The vmapped axis' name (collectives agree a cond's predicate over it).


def for_replica(sim: Simulation, inputs: ReplicaInputs) -> Simulation:
    """`sim` with one replica's attackers and links (arrays (N,), traced under vmap), inside
    the vmapped axis `AXIS`."""
    sim = sim._replace(replica_axis=AXIS)
    if inputs.byzantine is not None:
        sim = sim._replace(adversary=sim.adversary._replace(byzantine=inputs.byzantine))
    if inputs.links is not None:
        sim = sim._replace(clock=sim.clock._replace(links=inputs.links))
    return sim


def make_replica_iteration(sim: Simulation, distilling: bool = False):
    """The iteration of R replicas as a function to jit.

    Returns:
      iteration(states: FLState with leaves (R, N, ...), keys (R,), data: DeviceData with
      table (R, N, L) and counts (R, N) (x_train, y_train shared), inputs: ReplicaInputs,
      distill_weight=None) -> (states, info with every entry's leading axis R).
    """

    def one_replica(state, key, table, counts, inputs, x_train, y_train, distill_weight):
        data = DeviceData(x_train, y_train, table, counts)
        iteration = make_iteration(for_replica(sim, inputs), distilling)
        return iteration(state, key, data, distill_weight)

    def iteration(states, keys, data: DeviceData, inputs: ReplicaInputs, distill_weight=None):
        return jax.vmap(one_replica, in_axes=(0, 0, 0, 0, 0, None, None, None), axis_name=AXIS)(
            states, keys, data.table, data.counts, inputs, data.x_train, data.y_train,
            distill_weight)

    return iteration


def replica_keys(seeds) -> jax.Array:
    """(R,) the replicas' iteration keys: `fold_in(key(seed + r), 1)`, as a single run's."""
    return jnp.stack([jax.random.fold_in(jax.random.key(int(seed)), 1) for seed in seeds])


def keys_at(keys: jax.Array, t: int) -> jax.Array:
    """(R,) iteration t's keys of every replica."""
    return jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
