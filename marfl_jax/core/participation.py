"""Stage: who takes part in this iteration, and in which groups (`marfl_jax.churn` draws)."""

from __future__ import annotations

from marfl_jax import churn
from marfl_jax.core.stage import Context, Stage, Step


def participation(churn_model: churn.ChurnModel, algorithm) -> Stage:
    """Availability, trainers (peers with data among those drawn), each round's aggregators and
    the algorithm's groups over them.

    Sets `step.updating` (N,), `step.present` (G, N), `step.schedule` (G, N) and the peers'
    availability. Info: `updating_peers`.
    """

    def stage(step: Step, context: Context):
        keys = context.keys
        available = churn.next_availability(keys.availability, step.peers.available, churn_model)
        drawn = churn.draw_participation(keys.churn, available, algorithm.num_rounds, churn_model)
        updating = drawn.updating & (context.data.counts > 0)
        schedule = algorithm.schedule(drawn.present, keys.mixing)
        step = step._replace(peers=step.peers._replace(available=available), updating=updating,
                             present=drawn.present, schedule=schedule)
        return step, {"updating_peers": updating.sum()}

    return Stage(stage)
