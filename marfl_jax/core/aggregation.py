"""Stage: the algorithm's rounds of group means over weights and momentum (`marfl_jax.mixing`)."""

from __future__ import annotations

from marfl_jax import mixing
from marfl_jax.core.stage import Context, Stage, Step


def aggregate(mixer: mixing.Mixer, *, share_momentum: bool = True, counted=None) -> Stage:
    """Each round replaces every present peer's weights and momentum by what its group combines,
    the run's round function (`mixing.mixer`: the rule, the codec's wire, any attack; keyed by
    the step's attack key). `share_momentum=False`: weights only, each peer keeps its momentum;
    `counted`: (N,) bool, the peers the disagreement is measured over (the honest ones), None
    for all.

    Info: `consensus_before`, the present peers' disagreement before averaging.
    """

    def stage(step: Step, context: Context):
        peers = step.peers
        took_part = step.took_part if counted is None else step.took_part & counted
        before = mixing.consensus_distance(peers.params, took_part)
        shared = (peers.params, peers.opt_state) if share_momentum else (peers.params,)
        mixed = mixing.mix(shared, step.schedule, mixer, context.keys.attack)
        params, opt_state = mixed if share_momentum else (mixed[0], peers.opt_state)
        return (step._replace(peers=peers._replace(params=params, opt_state=opt_state)),
                {"consensus_before": before})

    return Stage(stage)
