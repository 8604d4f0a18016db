"""Stage: what the runner needs to account for the iteration (group sizes, agreement)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marfl_jax import comm, mixing
from marfl_jax.core.stage import Context, Stage, Step


def observe(num_groups: int, agreed: mixing.Grid | None = None, counted=None,
            axis_name: str | None = None) -> Stage:
    """Info: `member_sizes` (G, N) int32 (each peer's group size per round, 0 = absent; the
    ledger's input), `present` (N,) bool (took part in any round), `consensus_after` and
    `params_finite` () bool (every peer's every parameter is finite: the runner's divergence
    check: one reduction over the parameters, or over one peer's when all are equal).

    agreed: the grid of an aggregation that, where the step's schedule is that grid
    (`mixing.on_grid`), left every peer with bitwise the same parameters (one exact mean over
    all of them), so `consensus_after` is exactly 0, which `consensus_distance` would return
    after a pass over the whole state; where the schedule is not the grid, both are measured.
    counted: (N,) bool, the peers `consensus_after` is measured over (the honest ones; None:
    all). axis_name: a vmapped axis of replicas the grid check is agreed over
    (`mixing.grid_check`)."""

    def measured(params, took_part):
        return mixing.consensus_distance(params, took_part), params_finite(params)

    def equal(params, took_part):
        return jnp.float32(0.0), params_finite(jax.tree.map(lambda x: x[0], params))

    def stage(step: Step, context: Context):
        took_part = step.took_part if counted is None else step.took_part & counted
        operands = (step.peers.params, took_part)
        if agreed is None:
            consensus, finite = measured(*operands)
        else:
            consensus, finite = jax.lax.cond(mixing.grid_check(step.schedule, agreed, num_groups,
                                                               axis_name),
                                             equal, measured, *operands)
        return step, {
            "member_sizes": comm.member_sizes(step.schedule, num_groups),
            "present": step.took_part,
            "consensus_after": consensus,
            "params_finite": finite,
        }

    return Stage(stage)


def params_finite(params) -> jax.Array:
    """() bool: every leaf of `params` is free of NaN and infinities."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        return jnp.bool_(True)
    return jnp.stack([jnp.isfinite(leaf).all() for leaf in leaves]).all()
