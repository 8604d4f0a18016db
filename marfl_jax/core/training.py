"""Stage: every updating peer's b mini-batches of momentum SGD (`marfl_jax.local`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marfl_jax import data as data_lib
from marfl_jax import local
from marfl_jax.core.stage import Context, Stage, Step


def local_update(*, apply_fn, optimizer, local_batches: int, batch_size: int,
                 model_dropout: bool = False, peer_chunk: int = 0, label_map=None) -> Stage:
    """b batches of size B per peer, drawn without replacement from its own index table.

    Args:
      apply_fn: (params, x, rng) -> logits; rng None = evaluation mode.
      model_dropout: the model trains with dropout: every peer gets its own keys.
      peer_chunk: train the peers in sequential chunks of this many (0 = all at once).
      label_map: labels (N, b, B) -> what the peers train on (label flipping attackers), or None.
    Info: `train_loss`, the mean loss over the updating peers.
    """

    def stage(step: Step, context: Context):
        data = context.data
        peer_keys = jax.random.split(context.keys.sample, context.num_peers)
        index = data_lib.sample_peer_batches(peer_keys, data.table, data.counts, local_batches,
                                             batch_size)
        labels = data.y_train[index]
        if label_map is not None:
            labels = label_map(labels)
        params, opt_state, losses = local.peers_local_sgd(
            step.peers.params, step.peers.opt_state, data_lib.preprocess(data.x_train[index]),
            labels, step.updating,
            context.keys.train_dropout if model_dropout else None,
            apply_fn=apply_fn, optimizer=optimizer, peer_chunk=peer_chunk)
        updating = step.updating.sum()
        step = step._replace(peers=step.peers._replace(params=params, opt_state=opt_state))
        return step, {"train_loss": losses.sum() / jnp.maximum(updating, 1)}

    return Stage(stage)
