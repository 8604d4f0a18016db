"""Stage: the simulated clock, and the round deadline that turns stragglers into absentees.

Runs right after participation, so every later stage (MKD, DP, the averaging, the ledger) sees the
groups as they are after the deadline. See `marfl_jax.clock` for the time model.
"""

from __future__ import annotations

import jax.numpy as jnp

from marfl_jax import clock
from marfl_jax.core.stage import Context, Stage, Step


def timing(sim_clock: clock.Clock, algorithm, distilling: bool = False) -> Stage:
    """Compute, communication and coordination seconds of the iteration; with a deadline,
    members late in a round leave it and the rest of the iteration (the schedule is redrawn
    from the remaining presence for that round and the later ones).

    Info: `sim_compute_seconds`, `sim_comm_seconds`, `sim_coordination_seconds`,
    `sim_seconds` (their sum, () float32) and `stragglers` (() int32, members cut off).
    """
    num_groups = algorithm.num_groups
    num_rounds = algorithm.num_rounds
    timeout = sim_clock.timeout_s

    def stage(step: Step, context: Context):
        present, schedule = step.present, step.schedule
        cut_off = jnp.zeros(present.shape[1], bool)
        comm = jnp.float32(0.0)
        for r in range(num_rounds):
            times = sim_clock.round_times(schedule[r], num_groups)
            if timeout:
                late = clock.late_members(schedule[r], times, timeout)
                present = present & ~(late[None, :] & (jnp.arange(num_rounds) >= r)[:, None])
                redrawn = algorithm.schedule(present, context.keys.mixing)
                schedule = jnp.where((jnp.arange(num_rounds) >= r)[:, None], redrawn, schedule)
                times = sim_clock.round_times(schedule[r], num_groups)
                completion = jnp.where(late.any(), jnp.maximum(times.completion, timeout),
                                       times.completion)
                cut_off = cut_off | late
            else:
                completion = times.completion
            comm = comm + completion
        rounds = num_rounds
        if distilling:  # MKD's weight exchange (all-gather) over the same groups.
            for r in range(num_rounds):
                comm = comm + clock.allgather(schedule[r], num_groups, sim_clock.links,
                                              sim_clock.distill_message_bytes,
                                              sim_clock.server_bps).completion
            rounds += num_rounds
        compute = clock.compute_seconds(step.updating, sim_clock.examples, sim_clock.links)
        coordination = jnp.float32(sim_clock.coordination_seconds(rounds))
        step = step._replace(present=present, schedule=schedule)
        return step, {"sim_compute_seconds": compute, "sim_comm_seconds": comm,
                      "sim_coordination_seconds": coordination,
                      "sim_seconds": compute + comm + coordination,
                      "stragglers": cut_off.sum()}

    return Stage(stage)
