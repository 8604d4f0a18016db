"""The pure simulation: the state, the stage contract and the iteration's chain of stages.

Nothing here reads or writes files; `marfl_jax.runner` owns the host loop and its I/O.
"""

from marfl_jax.core.iteration import (
    Simulation,
    build_chain,
    initial_stage_states,
    make_iteration,
)
from marfl_jax.core.stage import (
    Context,
    Info,
    Privatized,
    Stage,
    Step,
    StepKeys,
    init_stages,
    run_chain,
    step_keys,
)
from marfl_jax.core.state import DeviceData, FLState, init_state

__all__ = [
    "Context",
    "DeviceData",
    "FLState",
    "Info",
    "Privatized",
    "Simulation",
    "Stage",
    "Step",
    "StepKeys",
    "build_chain",
    "init_stages",
    "init_state",
    "initial_stage_states",
    "make_iteration",
    "run_chain",
    "step_keys",
]
