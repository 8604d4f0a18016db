"""One FL iteration: the chain of stages, composed once per run.

    churn -> [adversary] -> [clock] -> local -> [dp] -> [mkd] -> mixing (or dp's) -> observe

Each stage has a module of its own in `marfl_jax/core/`, named for what it does
(`participation` draws who takes part with `marfl_jax.churn`, `aggregation` runs the rounds of
`marfl_jax.mixing`, ...); `observe` reads what the host accounts for.

`build_chain` is the one place that says which stages run and in what order, and so how DP and
MKD interact: under DP the aggregation is DP's (`privacy.private_aggregate`), and when both are
on, MKD distils from the noised models and the post-distillation difference is what is smoothed
(the authors' order). A new stage is a module with a factory returning a `Stage` and one line
here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from marfl_jax import comm, mixing, rules, sharding
from marfl_jax.adversary import flip_labels, message_transform
from marfl_jax.churn import ChurnModel
from marfl_jax.core import (
    aggregation,
    distillation,
    observe,
    participation,
    placement,
    privacy,
    timing,
    training,
)
from marfl_jax.core.stage import Context, Stage, Step, init_stages, run_chain, step_keys
from marfl_jax.core.state import DeviceData, FLState
from marfl_jax.dp import Privacy
from marfl_jax.mkd import Distillation


class Simulation(NamedTuple):
    """The static pieces of a run, from which its iterations are built (`marfl_jax.runner`
    makes one from a Config; code that extends the simulator may build its own).

    Attributes:
      apply_fn: (params, x, rng) -> logits (rng None: evaluation mode, a key: training mode).
      optimizer: every peer's optax transformation (its state is averaged as momentum).
      algorithm: a `marfl_jax.algorithms.Algorithm` (group schedule + wire).
      churn_model: participation, dropout and availability.
      local_batches, batch_size: b and B of local training.
      model_dropout: the model trains with dropout (per-peer keys).
      peer_chunk: local training in chunks of this many peers (0 = all at once).
      distillation: MKD's settings, or None.
      privacy: DP's settings, or None.
      mesh: the device mesh the peer axis is sharded over, or None.
      clock: the simulated clock's settings (`marfl_jax.clock.Clock`), or None.
      roundtrip: a lossy message codec's tree -> decoded tree (`marfl_jax.codec`), or None.
      slice_unit: values a butterfly slice keeps together (the codec's block; 1 elementwise).
      share_momentum: messages carry momentum beside the weights (False: weights only).
      aggregator: the group rule (`marfl_jax.rules.Rule`, bound to its parameters).
      adversary: the Byzantine peers (`marfl_jax.adversary.Adversary`), or None.
      replica_axis: the name of a vmapped axis of replicas around the iteration
        (`marfl_jax.core.replica_axis`), or None.
    """

    apply_fn: Any
    optimizer: optax.GradientTransformation
    algorithm: Any
    churn_model: ChurnModel
    local_batches: int
    batch_size: int
    model_dropout: bool = False
    peer_chunk: int = 0
    distillation: Distillation | None = None
    privacy: Privacy | None = None
    mesh: Any = None
    clock: Any = None
    roundtrip: Any = None
    slice_unit: int = 1
    share_momentum: bool = True
    aggregator: rules.Rule = rules.MEAN
    adversary: Any = None
    replica_axis: str | None = None


def everyone_takes_part(churn_model: ChurnModel, sim_clock=None) -> bool:
    """Every peer trains and aggregates in every round of every iteration (no churn, and no
    round deadline that could cut a member off)."""
    return (churn_model.update_fraction == 1 and churn_model.aggregate_fraction == 1
            and churn_model.dropout == 0 and churn_model.availability == "always"
            and not (sim_clock is not None and sim_clock.timeout_s))


def build_chain(sim: Simulation, distilling: bool = False) -> list[Stage]:
    """The stages of one iteration; `distilling` = an MKD iteration (t < K)."""
    num_groups = sim.algorithm.num_groups
    attackers = sim.adversary
    # Full participation on a grid schedule with the mean: rounds are reshape-and-mean (no
    # scatter), where the step finds the round's groups to be the grid's (`mixing.on_grid`).
    grid = (getattr(sim.algorithm, "grid", None)
            if sim.aggregator.exact_mean and message_transform_of(sim) is None
            and everyone_takes_part(sim.churn_model, sim.clock) else None)
    mean = mixing.mixer(num_groups, max_group_size=sim.algorithm.max_group_size, grid=grid,
                        axis_name=sim.replica_axis)
    mixer = group_mixer(sim, num_groups) or mean
    honest = None if attackers is None else attackers.honest
    chain = [participation.participation(sim.churn_model, sim.algorithm)]
    if attackers is not None:
        chain.append(placement.placement(attackers, num_groups))
    if sim.clock is not None:
        chain.append(timing.timing(sim.clock, sim.algorithm, distilling))
    chain.append(training.local_update(
        apply_fn=sim.apply_fn, optimizer=sim.optimizer, local_batches=sim.local_batches,
        batch_size=sim.batch_size, model_dropout=sim.model_dropout, peer_chunk=sim.peer_chunk,
        label_map=label_map(attackers)))
    private = sim.privacy is not None
    if private:
        chain.append(privacy.privatize(sim.privacy))
    if distilling:
        if sim.distillation is None:
            raise ValueError("an MKD iteration needs Simulation.distillation")
        if private:
            chain.append(privacy.noised_model_teaches(sim.privacy))
        chain.append(distillation.distill(
            sim.distillation, num_groups=num_groups,
            max_group_size=sim.algorithm.max_group_size, apply_fn=sim.apply_fn,
            optimizer=sim.optimizer, batch_size=sim.batch_size, model_dropout=sim.model_dropout,
            roundtrip=sim.roundtrip))
        if private:
            chain.append(privacy.distilled_update())
    chain.append(privacy.private_aggregate(sim.privacy, mixer, mean,
                                           share_momentum=sim.share_momentum) if private
                 else aggregation.aggregate(mixer, share_momentum=sim.share_momentum,
                                            counted=honest))
    # One exact mean over every grid axis leaves all peers bitwise equal.
    agreed = (grid is not None and not private and sim.roundtrip is None
              and {a for a, r in enumerate(grid.radices) if r > 1} <= set(grid.axes))
    chain.append(observe.observe(num_groups, grid if agreed else None, counted=honest,
                                 axis_name=sim.replica_axis))
    return chain


def message_transform_of(sim: Simulation):
    """What mates receive when it is not what members hold (`adversary.message_transform`):
    forged by attackers, or encoded for a rule other than the mean (the mean's coded paths are
    the wire's `combine`); None when they receive what members hold."""
    return message_transform(sim.adversary, sim.roundtrip if (
        sim.adversary is not None or not sim.aggregator.exact_mean) else None)


def group_mixer(sim: Simulation, num_groups: int, peer_of_slot=None) -> mixing.Mixer | None:
    """The round function of the run's rule, codec and attackers (`mixing.mixer`), or None
    when a round is the plain group mean. `peer_of_slot`: (K,) int32, the peer each of the K
    rows of the round's tree holds, for a round over some peers only (the attackers are known
    by peer id); None: the rows are the peers."""
    rule = sim.aggregator
    transform = message_transform_of(sim)
    if transform is None and rule.exact_mean and sim.roundtrip is None:
        return None
    if transform is not None and peer_of_slot is not None:
        by_row = transform

        def transform(slots, filled, slot_row, key):
            peers = jnp.where(slot_row >= 0, peer_of_slot[jnp.maximum(slot_row, 0)], -1)
            return by_row(slots, filled, peers, key)

    coded = transform is None and sim.roundtrip is not None
    return mixing.mixer(
        num_groups, rule, max_group_size=sim.algorithm.max_group_size,
        roundtrip=sim.roundtrip if coded else None, transform=transform, unit=sim.slice_unit,
        combine=comm.coded_combine(sim.algorithm.wire) if coded else None)


def initial_stage_states(sim: Simulation, peers: FLState) -> dict[str, Any]:
    """The states of every stage either iteration variant runs, by name, from the peers'
    initial state (peer axis first): what `FLState.stages` starts as."""
    states = init_stages(build_chain(sim), peers)
    if sim.distillation is not None:
        states.update(init_stages(build_chain(sim, True), peers))
    return states


def label_map(attackers):
    """Label flipping attackers' labels (`adversary.flip_labels`), or None."""
    if attackers is None or not attackers.attack.poisons_labels:
        return None
    byzantine = jnp.asarray(attackers.byzantine)
    return lambda labels: flip_labels(labels, byzantine, attackers.num_classes)


def make_iteration(sim: Simulation, distilling: bool = False):
    """The iteration as a function to jit.

    Returns:
      iteration(state: FLState, key, data: DeviceData, distill_weight=None) -> (FLState, info),
      info merging every stage's (see each stage's docstring); the state keeps the peer
      sharding of `sim.mesh`.
    """
    chain = build_chain(sim, distilling)

    def iteration(state: FLState, key: jax.Array, data: DeviceData,
                  distill_weight: jax.Array | None = None):
        context = Context(data, step_keys(key, data.counts.shape[0]), distill_weight)
        step, info = run_chain(chain, Step(state), context)
        return sharding.constrain_peers(step.peers, sim.mesh), info

    return iteration
