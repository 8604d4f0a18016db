"""Stage: the algorithm's rounds of group means over weights and momentum (`marfl_jax.mixing`)."""

from __future__ import annotations

from marfl_jax import mixing
from marfl_jax.core.stage import Context, Stage, Step


def aggregate(num_groups: int, grid: mixing.Grid | None = None, *, roundtrip=None,
              combine=None, unit: int = 1, share_momentum: bool = True,
              rule=None, max_group_size: int | None = None, transform=None,
              counted=None) -> Stage:
    """Each round replaces every present peer's weights and momentum by its group's mean, or
    what the group `rule` combines (`marfl_jax.rules`; None = the mean) (`grid`: the schedule's
    grid, given only when every peer takes part; `roundtrip`: a lossy codec's, then each
    round is the wire's `combine` of coded copies (`marfl_jax.comm.Wire.combine`) with
    `unit`; `share_momentum=False`: weights only, each peer keeps its momentum; `transform`:
    what mates receive from what members hold, e.g. Byzantine attacks (`mixing.mix`), keyed by
    the step's attack key; `counted`: (N,) bool, the peers the disagreement is measured over
    (the honest ones), None for all).

    Info: `consensus_before`, the present peers' disagreement before averaging.
    """

    def stage(step: Step, context: Context):
        peers = step.peers
        took_part = step.took_part if counted is None else step.took_part & counted
        before = mixing.consensus_distance(peers.params, took_part)
        shared = (peers.params, peers.opt_state) if share_momentum else (peers.params,)
        mixed = mixing.mix(shared, step.schedule, num_groups, grid, roundtrip, combine, unit,
                           rule, max_group_size, transform, context.keys.attack)
        params, opt_state = mixed if share_momentum else (mixed[0], peers.opt_state)
        return (step._replace(peers=peers._replace(params=params, opt_state=opt_state)),
                {"consensus_before": before})

    return stage
