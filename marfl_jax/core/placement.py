"""Stage: where the Byzantine peers sit in this iteration's groups (`marfl_jax.adversary`)."""

from __future__ import annotations

import jax.numpy as jnp

from marfl_jax import adversary as adversary_lib
from marfl_jax.core.stage import Context, Stage, Step


def placement(attackers: adversary_lib.Adversary, num_groups: int) -> Stage:
    """With `--byzantine_placement=collude` the present attackers are packed into the same
    groups in every round (`adversary.collude`: group sizes and presence unchanged).

    Sets `step.schedule` (collude). Info: `byzantine_peers`, the attackers present in any round.
    """
    byzantine = jnp.asarray(attackers.byzantine)

    def stage(step: Step, context: Context):
        if attackers.placement == "collude":
            step = step._replace(schedule=adversary_lib.collude_schedule(
                step.schedule, byzantine, num_groups))
        return step, {"byzantine_peers": (step.took_part & byzantine).sum()}

    return Stage(stage)
