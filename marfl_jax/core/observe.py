"""Stage: what the runner needs to account for the iteration (group sizes, agreement)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marfl_jax import comm, mixing
from marfl_jax.core.stage import Context, Stage, Step


def observe(num_groups: int, agreed: bool = False) -> Stage:
    """Info: `member_sizes` (G, N) int32 (each peer's group size per round, 0 = absent; the
    ledger's input), `present` (N,) bool (took part in any round), `consensus_after` and
    `params_finite` () bool (every peer's every parameter is finite: the runner's divergence
    check: one reduction over the parameters, or over one peer's when all are equal).

    agreed: the aggregation left every peer with bitwise the same parameters (one exact mean
    over all of them), so `consensus_after` is exactly 0, which `consensus_distance` would
    return after a pass over the whole state."""

    def stage(step: Step, context: Context):
        return step, {
            "member_sizes": comm.member_sizes(step.schedule, num_groups),
            "present": step.took_part,
            "consensus_after": (jnp.float32(0.0) if agreed else
                                mixing.consensus_distance(step.peers.params, step.took_part)),
            "params_finite": params_finite(jax.tree.map(lambda x: x[0], step.peers.params)
                                           if agreed else step.peers.params),
        }

    return stage


def params_finite(params) -> jax.Array:
    """() bool: every leaf of `params` is free of NaN and infinities."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        return jnp.bool_(True)
    return jnp.stack([jnp.isfinite(leaf).all() for leaf in leaves]).all()
