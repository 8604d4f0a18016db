"""Stage: the algorithm's rounds of group means over weights and momentum (`marfl_jax.mixing`)."""

from __future__ import annotations

from marfl_jax import mixing
from marfl_jax.core.stage import Context, Stage, Step

# The key of a group rule's per-peer state (`marfl_jax.rules.Rule.init`) in `FLState.stages`.
AGGREGATOR = "aggregator"


def aggregate(mixer: mixing.Mixer, *, share_momentum: bool = True, counted=None) -> Stage:
    """Each round replaces every present peer's weights and momentum by what its group combines,
    the run's round function (`mixing.mixer`: the rule, the codec's wire, any attack; keyed by
    the step's attack key). `share_momentum=False`: weights only, each peer keeps its momentum;
    `counted`: (N,) bool, the peers the disagreement is measured over (the honest ones), None
    for all. A rule with state (`Rule.init`, from the initial message) keeps it in
    `FLState.stages[AGGREGATOR]`.

    Info: `consensus_before`, the present peers' disagreement before averaging.
    """

    def shared_of(peers):
        return (peers.params, peers.opt_state) if share_momentum else (peers.params,)

    def stage(step: Step, context: Context):
        peers = step.peers
        took_part = step.took_part if counted is None else step.took_part & counted
        before = mixing.consensus_distance(peers.params, took_part)
        if mixer.init is None:
            mixed = mixing.mix(shared_of(peers), step.schedule, mixer, context.keys.attack)
        else:
            mixed, rule_state = mixing.mix_with_state(
                shared_of(peers), step.stage_state(AGGREGATOR), step.schedule, mixer,
                context.keys.attack)
            step = step.with_stage_state(AGGREGATOR, rule_state)
        params, opt_state = mixed if share_momentum else (mixed[0], peers.opt_state)
        return (step._replace(peers=step.peers._replace(params=params, opt_state=opt_state)),
                {"consensus_before": before})

    if mixer.init is None:
        return Stage(stage)
    return Stage(stage, init=lambda peers: mixer.init(shared_of(peers)), state=AGGREGATOR)
