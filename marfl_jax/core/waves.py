"""Asynchronous Moshpit on the device: one wave's groups combine, its peers train.

The host's timeline (`marfl_jax.events`) decides who meets whom and when; a wave is the set of
operations whose peers are ready (`events.waves`). On the device a wave is two jitted steps over
a *bucket*: the K peers the step touches, gathered from the peer axis (K a power of two, or all
N peers in peer order: then nothing is gathered and the peers outside the wave are masked):

* `train_wave(state, data, peers (K,), versions (K,), active (K,), count)`: local phase
  `version` of each active peer, with the mini-batches and dropout keys of synchronous
  iteration `version` (`stage.step_keys`), so a peer's phase v is the synchronous iteration v's
  local update of that peer.
* `mix_wave(state, peers (K,), group_ids (K,), count, key)`: one round of the run's group
  rule (`marfl_jax.mixing.mixer`: rule, codec, attack) over the bucket's groups, ids in
  [0, K // 2) (a group has two members or more), -1 for the rest.
* `mean_wave(state, peers (K,), weights (K,))`: the plain mean of groups laid out in slots of
  M rows each (the buckets' way when the round is the plain group mean).

The bucket's first `count` rows are the wave's peers (the rest repeat peer 0 and are inactive);
results are written back row by row into the donated state (`_put_back`: O(count) rows, no
float scatter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marfl_jax import data as data_lib
from marfl_jax import local, mixing
from marfl_jax.adversary import flip_labels
from marfl_jax.core import aggregation
from marfl_jax.core.iteration import Simulation, group_mixer
from marfl_jax.core.stage import step_keys
from marfl_jax.core.state import DeviceData, FLState


def phase_keys(iteration_key, versions: jax.Array, peers: jax.Array, num_peers: int):
    """Each (peer, version)'s mini-batch key and model-dropout key, as synchronous iteration
    `version` gives them to that peer. iteration_key: the run's key of iteration 0's base
    (`fold_in(key(seed), 1)`); versions, peers: (K,) int32 -> two (K,) key arrays."""

    def one(version, peer):
        keys = step_keys(jax.random.fold_in(iteration_key, version), num_peers)
        return (jax.random.split(keys.sample, num_peers)[peer], keys.train_dropout[peer])

    return jax.vmap(one)(versions, peers)


def _take(tree, peers, everyone: bool):
    return tree if everyone else jax.tree.map(lambda x: x[peers], tree)


def _put_back(tree, bucket, peers, count, everyone: bool):
    """The state with bucket rows [0, count) written to their peers, one row at a time into
    the (donated) state: O(count) rows moved, no float scatter. The bucket of every peer in
    peer order is the new state itself."""
    if everyone:
        return bucket

    def leaf(x, b):
        def write(i, x):
            return jax.lax.dynamic_update_index_in_dim(x, b[i], peers[i], 0)

        return jax.lax.fori_loop(0, count, write, x)

    return jax.tree.map(leaf, tree, bucket)


def train_wave(sim: Simulation, num_peers: int, seed: int):
    """(state, data, peers, versions, active, count) -> (state, summed loss of the active
    peers); jit with the bucket's size static through the shapes."""
    iteration_key = jax.random.fold_in(jax.random.key(seed), 1)
    attackers = sim.adversary
    flips = attackers is not None and attackers.attack.poisons_labels

    def step(state: FLState, data: DeviceData, peers, versions, active, count):
        size = peers.shape[0]
        everyone = size == num_peers
        sample_keys, dropout_keys = phase_keys(iteration_key, versions, peers, num_peers)
        index = data_lib.sample_peer_batches(sample_keys, data.table[peers], data.counts[peers],
                                             sim.local_batches, sim.batch_size)
        labels = data.y_train[index]
        if flips:
            labels = flip_labels(labels, jnp.asarray(attackers.byzantine)[peers],
                                 attackers.num_classes)

        def train(params, opt_state, rows, rows_active, peer_chunk=0):
            """Local phases of the bucket rows `rows` ((C,) or a slice) from their states."""
            return local.peers_local_sgd(
                params, opt_state, data_lib.preprocess(data.x_train[index[rows]]),
                labels[rows], rows_active, dropout_keys[rows] if sim.model_dropout else None,
                apply_fn=sim.apply_fn, optimizer=sim.optimizer, peer_chunk=peer_chunk)

        chunk = sim.peer_chunk
        if everyone or not chunk or chunk >= size:
            # All N peers in order (the plan's chunks run in place), or the bucket at once.
            params, opt_state = _take((state.params, state.opt_state), peers, everyone)
            params, opt_state, losses = train(params, opt_state, slice(None), active,
                                              sim.peer_chunk if everyone else 0)
            new_params, new_opt = _put_back((state.params, state.opt_state),
                                            (params, opt_state), peers, count, everyone)
            return state._replace(params=new_params, opt_state=new_opt), losses.sum()

        # The plan's chunks of C rows, each read from and written back to the state in place:
        # each peer's rows cross memory once, as in the synchronous chunk loop. A last chunk
        # past the bucket overlaps the one before; its rows trained already are inactive.
        def train_chunk(i, carry):
            tree, total = carry
            start = jnp.minimum(i * chunk, size - chunk)
            rows = start + jnp.arange(chunk)
            fresh = rows >= i * chunk
            mine = peers[rows]
            params, opt_state, losses = train(*_take(tree, mine, False), rows,
                                              active[rows] & fresh)
            tree = _put_back(tree, (params, opt_state), mine, chunk, False)
            return tree, total + losses.sum()

        tree, total = jax.lax.fori_loop(
            0, (count + chunk - 1) // chunk, train_chunk,
            ((state.params, state.opt_state), jnp.float32(0.0)))
        return state._replace(params=tree[0], opt_state=tree[1]), total

    return step


def mean_wave(sim: Simulation, group_size: int):
    """(state, peers (K,), weights (K,) float32) -> state: the plain group mean over a bucket
    laid out in slots, K = groups x `group_size` rows, group g in rows [g M, (g + 1) M). A
    group's real members have weight 1; its other slots have weight 0 and name one of its
    members, so writing the group's mean to every slot's peer is right in any order.

    Two loops of dynamic slices: each group's M rows read and averaged into a (groups, ...)
    buffer, then each slot's peer written in place in the donated state; each row crosses
    memory once each way, where a gathered bucket would be copied whole several times."""
    share_momentum = sim.share_momentum

    def step(state: FLState, peers, weights):
        size = peers.shape[0]
        num_groups = size // group_size
        slots = peers.reshape(num_groups, group_size)
        slot_weights = weights.reshape(num_groups, group_size)
        counts = jnp.maximum(slot_weights.sum(axis=1), 1.0)

        def mean(x):
            if not jnp.issubdtype(x.dtype, jnp.floating):  # Integer leaves are not averaged.
                return x
            w = slot_weights.astype(x.dtype).reshape((num_groups, group_size)
                                                     + (1,) * (x.ndim - 1))

            def group_mean(g, means):  # Reads only: the state is not written in this loop.
                value = sum(w[g, j] * jax.lax.dynamic_index_in_dim(x, slots[g, j], 0, False)
                            for j in range(group_size))  # Row slices: no gather.
                return jax.lax.dynamic_update_index_in_dim(
                    means, value / counts[g].astype(x.dtype), g, 0)

            means = jax.lax.fori_loop(0, num_groups, group_mean,
                                      jnp.zeros((num_groups,) + x.shape[1:], x.dtype))

            def write(i, x):  # Writes only, in place.
                return jax.lax.dynamic_update_index_in_dim(
                    x, jax.lax.dynamic_index_in_dim(means, i // group_size, 0, keepdims=False),
                    peers[i], 0)

            return jax.lax.fori_loop(0, size, write, x)

        shared = (state.params, state.opt_state) if share_momentum else (state.params,)
        shared = jax.tree.map(mean, shared)
        return state._replace(params=shared[0],
                              opt_state=shared[1] if share_momentum else state.opt_state)

    return step


def mix_wave(sim: Simulation, num_peers: int):
    """(state, peers, group_ids, count, key) -> state: one round of the run's group rule over
    the bucket's groups (weights and momentum, or weights only without --share_momentum; a
    rule's per-peer state in `FLState.stages[aggregation.AGGREGATOR]`)."""
    share_momentum = sim.share_momentum

    def step(state: FLState, peers, group_ids, count, key):
        size = peers.shape[0]
        everyone = size == num_peers
        num_groups = max(size // 2, 1)
        mixer = (group_mixer(sim, num_groups, None if everyone else peers)
                 or mixing.mixer(num_groups, max_group_size=sim.algorithm.max_group_size))
        shared = (state.params, state.opt_state) if share_momentum else (state.params,)
        rule_state = (state.stages[aggregation.AGGREGATOR] if mixer.init is not None
                      else None)
        bucket, bucket_state = mixer.round(_take(shared, peers, everyone), group_ids, key,
                                           _take(rule_state, peers, everyone))
        shared = _put_back(shared, bucket, peers, count, everyone)
        state = state._replace(params=shared[0],
                               opt_state=shared[1] if share_momentum else state.opt_state)
        if rule_state is not None:
            state = state._replace(stages={
                **state.stages,
                aggregation.AGGREGATOR: _put_back(rule_state, bucket_state, peers, count,
                                                  everyone)})
        return state

    return step
