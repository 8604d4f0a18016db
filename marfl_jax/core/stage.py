"""The stage contract: one FL iteration is a chain of small pure functions of one carry.

    stage(step: Step, context: Context) -> (step: Step, info: dict[str, jax.Array])

A `Stage` is that function (`update`) and, for a stage that keeps something from one iteration
to the next, optax's other half: `init(peers) -> state` (from the initial `FLState`, leaves with
the peer axis first; the state too, for per-peer state) and the name its state is kept under,
`FLState.stages[name]`.
The run state holds every stage's state in that one dict, so it is checkpointed and restored
with the peers' models (DP's clip thresholds, references and smoothed updates are the first).
A stage reads and writes its state through the step (`Step.stage_state`, `Step.with_stage_state`);
several stages may share one state (DP's), which exactly one of them initialises. A plain
function with the contract's signature is a stage without state.

`Step` carries the peers' state through the iteration together with what earlier stages decided
(who trains, who takes part in which round, the groups, DP's privatized update); a stage returns
it updated with `_replace` and adds its metrics to the iteration's `info`. A 0-d entry IS a
metric: the runner writes every one as a field of the iteration's row, converted by its dtype
(float, int or bool), so a new metric is one entry here and nothing else. Entries with a round
or peer axis (observe's `member_sizes` (G, N) and `present` (N,)) are the host's inputs (the
ledger's bytes, who is evaluated), as are two 0-d entries the host reads instead of writing:
`params_finite` (the divergence watch) and DP's `aggregating` (the accountant).

`Context` holds what no stage changes: the device data, this iteration's named random keys and
MKD's lambda. Stages close over their static settings (built once per config by
`marfl_jax.core.iteration.build_chain`); everything runs inside one `jit`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

from marfl_jax.core.state import DeviceData, FLState

Info = dict[str, jax.Array]


class StepKeys(NamedTuple):
    """The iteration's random keys, one per purpose (derived from the iteration key only, so a
    run is a function of its seed and resumes bit-identically)."""

    sample: jax.Array  # Local mini-batches.
    mixing: jax.Array  # Random group schedules (gossip).
    churn: jax.Array  # Trainers, aggregators, dropouts.
    availability: jax.Array  # Markov on/off chains.
    train_dropout: jax.Array  # (N,) per-peer model-dropout keys of local training.
    distill_dropout: jax.Array  # (N,) per-peer model-dropout keys of MKD's training passes.
    distill: jax.Array  # MKD's distillation batches.
    dp_noise: jax.Array  # DP: the updates' Gaussian noise.
    dp_clip: jax.Array  # DP: the noise of the averaged clip indicator.
    attack: jax.Array  # Byzantine peers' forged messages (gaussian).


def step_keys(key: jax.Array, num_peers: int) -> StepKeys:
    """Named keys of one iteration from its key. (The derivations are fixed: changing one
    changes every run's trajectory.)"""
    sample, mixing, churn, availability = jax.random.split(key, 4)
    train_dropout, distill_dropout = jax.random.split(jax.random.fold_in(key, 7), (2, num_peers))
    dp_noise, dp_clip = jax.random.split(jax.random.fold_in(key, 6))
    return StepKeys(sample, mixing, churn, availability, train_dropout, distill_dropout,
                    jax.random.fold_in(key, 5), dp_noise, dp_clip, jax.random.fold_in(key, 8))


class Privatized(NamedTuple):
    """DP's step 1 for every peer (see `marfl_jax.dp`): leaves / arrays with peer axis N."""

    update: Any  # The update the peer smooths and shares (a params tree).
    unclipped: jax.Array  # (N,) float32 indicator b = [||Delta|| <= S].
    norms: jax.Array  # (N,) norm of Delta before clipping.


class Step(NamedTuple):
    """The carry of one iteration's stages.

    Attributes:
      peers: the FLState being advanced (peer axis N).
      updating: (N,) bool, peers that train this iteration (set by participation).
      present: (G, N) bool, peers taking part in each aggregation round.
      schedule: (G, N) int32 group ids of each round (-1 = absent).
      privatized: DP's clipped, noised update (set by privatize), else None.
    """

    peers: FLState
    updating: jax.Array | None = None
    present: jax.Array | None = None
    schedule: jax.Array | None = None
    privatized: Privatized | None = None

    def stage_state(self, name: str):
        """The state the stages named `name` keep (`FLState.stages[name]`)."""
        return self.peers.stages[name]

    def with_stage_state(self, name: str, value) -> Step:
        """The step with `FLState.stages[name]` replaced by `value`."""
        return self._replace(peers=self.peers._replace(stages={**self.peers.stages,
                                                               name: value}))

    @property
    def aggregating(self) -> jax.Array:
        """(N,) bool, peers that start the aggregation (presence only ends within it)."""
        return self.present[0]

    @property
    def took_part(self) -> jax.Array:
        """(N,) bool, peers present in any round."""
        return self.present.any(axis=0)


class Context(NamedTuple):
    """What no stage changes within an iteration."""

    data: DeviceData
    keys: StepKeys
    distill_weight: jax.Array | None = None  # MKD's lambda in a distillation iteration.

    @property
    def num_peers(self) -> int:
        return self.data.counts.shape[0]


class Stage(NamedTuple):
    """One stage of the iteration (see the module docstring).

    Attributes:
      update: (step, context) -> (step, info).
      init: (the initial FLState, its `stages` empty) -> the stage's initial state, or None for
        a stage that keeps nothing (or reads a state another stage initialises).
      state: the key of its state in `FLState.stages` (with `init`, or to name the state it
        shares), else None.
    """

    update: Callable[[Step, Context], tuple[Step, Info]]
    init: Callable[[Any], Any] | None = None
    state: str | None = None

    def __call__(self, step: Step, context: Context) -> tuple[Step, Info]:
        return self.update(step, context)


def init_stages(stages: Sequence[Stage], peers: FLState) -> dict[str, Any]:
    """Every stage's initial state by name, from the peers' initial state (peer axis first).
    ValueError when two stages initialise one name."""
    states = {}
    for stage in stages:
        if getattr(stage, "init", None) is None:  # A plain function is a stage without state.
            continue
        if stage.state is None:
            raise ValueError(f"a stage with an init names no state: {stage}")
        if stage.state in states:
            raise ValueError(f"two stages initialise the state {stage.state!r}")
        states[stage.state] = stage.init(peers)
    return states


def run_chain(stages: Sequence[Stage], step: Step, context: Context) -> tuple[Step, Info]:
    """Applies the stages in order; their infos are merged (a later key replaces an earlier)."""
    info: Info = {}
    for stage in stages:
        step, stage_info = stage(step, context)
        info.update(stage_info)
    return step, info
