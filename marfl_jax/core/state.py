"""What the simulation carries from one iteration to the next, and its initial value."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from marfl_jax import churn


class FLState(NamedTuple):
    """Every peer's model and optimizer state (leaves with leading peer axis N), whether each
    peer is available (Markov churn), (N,) bool, and the stages' states by name
    (`marfl_jax.core.stage.Stage`; under DP `stages["privacy"]` is each peer's
    `dp.PrivacyState`)."""

    params: Any
    opt_state: Any
    available: jax.Array
    stages: dict[str, Any]


class DeviceData(NamedTuple):
    """The shared training array and the peers' index tables, resident on the device."""

    x_train: jax.Array  # (n_train, 28, 28) uint8 images or (n_train, D) float32 features.
    y_train: jax.Array  # (n_train,) int32.
    table: jax.Array  # (N, L) int32 indices into the training array.
    counts: jax.Array  # (N,) int32 valid entries per row.


def init_state(model, optimizer, sample_input: jax.Array, num_peers: int, key: jax.Array,
               churn_model: churn.ChurnModel, init_stages=None) -> FLState:
    """Every peer starts from the same initial model (as the authors' seeded processes do).

    Args:
      model: a flax module; `model.init(key, sample_input)["params"]` is one peer's params.
      optimizer: the optax transformation whose state every peer carries.
      sample_input: (1, ...) one input example.
      init_stages: the initial FLState (its `stages` empty) -> the stages' states by name
        (`marfl_jax.core.iteration.initial_stage_states(sim, peers)`); None: no stage keeps
        state.
    Returns:
      FLState with every leaf stacked on a leading axis of N peers.
    """
    model_key, availability_key = jax.random.split(key)
    params = model.init(model_key, sample_input)["params"]
    opt_state = optimizer.init(params)
    stack = functools.partial(jax.tree.map, lambda x: jnp.broadcast_to(x, (num_peers,) + x.shape))
    params = stack(params)
    peers = FLState(params, stack(opt_state),
                    churn.initial_availability(availability_key, num_peers, churn_model), {})
    return peers if init_stages is None else peers._replace(stages=init_stages(peers))
