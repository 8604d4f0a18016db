"""Asynchronous Moshpit runs (`--asynchronous`): the host's timeline, the device's waves, rows
by simulated time.

    timeline (marfl_jax.events) -> operations done by second T -> waves -> jitted steps -> row

Row k covers the simulated seconds ((k) * dt, (k + 1) * dt], dt = `--row_every_s`: the
operations that completed in it (local phases, groups) ran on the device in dependency waves,
so the state at the row is the peers' models at second (k + 1) * dt. The run ends at the row in
which the local phases done reach `--max_iterations` x N (the synchronous run's training), or at
the evaluation that reaches `--target_accuracy`. A resumed run replays the timeline (a function
of the config alone) to its checkpoint's row and goes on from there.

Rows carry the synchronous rows' fields where they mean the same (the ledger's bytes, group
sizes, train_loss, consensus_after, the evaluation) and: `cumulative_sim_seconds`,
`local_phases` / `cumulative_local_phases`, `groups` (of two or more), `alone` (peers whose
window ended without a mate), `waves`, `wave_size_mean` (peers per device wave),
`staleness_mean` / `staleness_max` (the gap between the local phase counts of a group's
members, over the row's groups).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from marfl_jax import clock, comm, events, mixing
from marfl_jax.core import waves as waves_lib
from marfl_jax.core.iteration import Simulation, group_mixer
from marfl_jax.core.observe import params_finite
from marfl_jax.core.state import DeviceData, FLState

LAYOUTS = ("masks", "buckets")  # --wave_layout (the plan's choice with auto).
# Completion times within this fraction of a row's end belong to it (sums of float32 times).
_TIME_TOLERANCE = 1e-9


def group_timer(sim_clock: clock.Clock, max_group_size: int
                ) -> Callable[[tuple[int, ...]], float]:
    """members (sorted peer ids, at most `max_group_size`) -> seconds of their exchange, kept
    per member set: the wire's host formula for one group (`Wire.group_seconds`), or else its
    device timing of a round (`Wire.seconds`) run on the CPU for that group (padded to
    `max_group_size` with absent rows: one compilation)."""
    links = clock.Links(*(np.asarray(x) for x in sim_clock.links))
    wire = sim_clock.wire
    seconds: dict[tuple[int, ...], float] = {}
    if wire.group_seconds is not None:
        def measure(index: np.ndarray) -> float:
            return wire.group_seconds(clock.Links(*(x[index] for x in links)),
                                      sim_clock.message_bytes, sim_clock.server_bps)
    else:
        cpu = jax.devices("cpu")[0]

        @jax.jit
        def completion(ids, sub: clock.Links):
            return wire.seconds(ids, 1, sub, sim_clock.message_bytes,
                                sim_clock.server_bps).completion

        def measure(index: np.ndarray) -> float:
            padded = np.zeros(max_group_size, np.int64)
            padded[:index.size] = index
            ids = np.where(np.arange(max_group_size) < index.size, 0, -1).astype(np.int32)
            return float(completion(*jax.device_put(
                (ids, clock.Links(*(x[padded] for x in links))), cpu)))

    def group_seconds(members: tuple[int, ...]) -> float:
        if members not in seconds:
            seconds[members] = measure(np.asarray(members))
        return seconds[members]

    return group_seconds


def make_timeline(sim: Simulation, *, window_s: float, group_size: int, has_data: np.ndarray,
                  churn: events.Churn | None, seed: int) -> events.Timeline:
    """The run's timeline: the algorithm's keys (MAR-FL's Moshpit keys; gossip one key, pairs),
    the clock's compute seconds and group timing."""
    algorithm = sim.algorithm
    rule = getattr(algorithm, "key_rule", None)
    if rule is not None:
        keys = events.Keys(np.asarray(rule.initial_keys, np.int64), rule.group_of, rule.next_key)
    else:
        keys = events.one_key(len(has_data))
    speed = np.asarray(sim.clock.links.examples_per_s)
    compute_s = (np.float32(sim.clock.examples) / speed).astype(np.float64)
    return events.Timeline(keys, algorithm.num_rounds, group_size, window_s, compute_s,
                           group_timer(sim.clock, group_size), has_data=has_data, churn=churn,
                           seed=seed)


def bucket_size(count: int, num_peers: int, layout: str) -> int:
    """The rows of a wave's step over `count` peers: all N ('masks', or when the next power of
    two is not smaller), else the next power of two."""
    if layout == "masks":
        return num_peers
    size = 1 << max(0, (count - 1).bit_length())
    return num_peers if size >= num_peers else size


class WaveSteps:
    """The jitted wave steps of a run, compiled once per bucket size (donating the state)."""

    def __init__(self, sim: Simulation, abstract_state, data: DeviceData, seed: int,
                 layout: str = "buckets"):
        if layout not in LAYOUTS:
            raise ValueError(f"wave layout {layout!r}: one of {LAYOUTS}")
        self._sim, self._abstract_state, self._data, self._layout = (sim, abstract_state, data,
                                                                     layout)
        self.num_peers = int(data.counts.shape[0])
        self._train = jax.jit(waves_lib.train_wave(sim, self.num_peers, seed), donate_argnums=0)
        self._mix = jax.jit(waves_lib.mix_wave(sim, self.num_peers), donate_argnums=0)
        # The plain mean in buckets: groups in slots of M rows, one reshape-and-mean.
        self._group_size = sim.algorithm.max_group_size
        self._slots = (layout == "buckets" and group_mixer(sim, 1) is None)
        self._mean = jax.jit(waves_lib.mean_wave(sim, self._group_size), donate_argnums=0)
        self._attack_key = jax.random.fold_in(jax.random.key(seed), 3)
        self._train_all = None
        self.observe = jax.jit(lambda params, counted: (
            mixing.consensus_distance(params, counted), params_finite(params)))

    def compiled(self, distilling: bool = False):
        """The train step over all N peers, compiled (the memory estimate's; the steps over all
        peers then run it)."""
        del distilling
        if self._train_all is None:
            n = self.num_peers
            ints = jax.ShapeDtypeStruct((n,), jnp.int32)
            self._train_all = self._train.lower(
                self._abstract_state, self._data, ints, ints, jax.ShapeDtypeStruct((n,), bool),
                jax.ShapeDtypeStruct((), jnp.int32)).compile()
        return self._train_all

    def _bucket(self, peers: list[int]):
        """(bucket peers (K,), each listed peer's row) for a wave over `peers`: all N in peer
        order, or the listed peers first, then peer 0 repeated (inactive rows)."""
        n = self.num_peers
        size = bucket_size(len(peers), n, self._layout)
        if size == n:
            return np.arange(n, dtype=np.int32), np.asarray(peers, np.int32)
        bucket = np.zeros(size, np.int32)
        bucket[:len(peers)] = peers
        return bucket, np.arange(len(peers), dtype=np.int32)

    def train(self, state: FLState, trains: tuple[events.Train, ...]):
        """The wave's local phases: (state, summed loss)."""
        bucket, rows = self._bucket([op.peer for op in trains])
        versions = np.zeros(bucket.size, np.int32)
        active = np.zeros(bucket.size, bool)
        versions[rows] = [op.version for op in trains]
        active[rows] = True
        step = self.compiled() if bucket.size == self.num_peers else self._train
        return step(state, self._data, bucket, versions, active, np.int32(len(trains)))

    def mix(self, state: FLState, mixes: tuple[events.Mix, ...], wave: int) -> FLState:
        """The wave's groups, one round of the rule each (attack key: the wave's number)."""
        if self._slots:
            m = self._group_size
            groups = 1 << max(0, (len(mixes) - 1).bit_length())
            peers = np.zeros((groups, m), np.int32)
            weights = np.zeros((groups, m), np.float32)
            for g in range(groups):
                members = mixes[g if g < len(mixes) else 0].peers
                peers[g] = members[0]  # Empty slots name a member of their group.
                peers[g, :len(members)] = members
                weights[g, :len(members)] = 1.0 if g < len(mixes) else 0.0
                if g >= len(mixes):  # A padding group: group 0 again, weights as its own.
                    weights[g, :len(members)] = 1.0
            return self._mean(state, peers.reshape(-1), weights.reshape(-1))
        peers = [p for m in mixes for p in m.peers]
        bucket, rows = self._bucket(peers)
        ids = np.full(bucket.size, -1, np.int32)
        ids[rows] = np.repeat(np.arange(len(mixes), dtype=np.int32),
                              [len(m.peers) for m in mixes])
        return self._mix(state, bucket, ids, np.int32(len(peers)),
                         jax.random.fold_in(self._attack_key, wave))


def ledger_rounds(mixes: list[events.Mix], num_peers: int) -> np.ndarray:
    """(R, N) member group sizes of a row's groups (lone peers as groups of one), each group in
    the first round after its members' previous ones: the synchronous rounds when every peer
    keeps pace."""
    rounds: list[np.ndarray] = []
    last = np.full(num_peers, -1)
    for group in mixes:
        members = list(group.peers)
        r = int(last[members].max()) + 1
        while len(rounds) <= r:
            rounds.append(np.zeros(num_peers, np.int64))
        rounds[r][members] = len(members)
        last[members] = r
    return np.stack(rounds) if rounds else np.zeros((0, num_peers), np.int64)


def churn_of(sim: Simulation) -> events.Churn | None:
    """The timeline's per-phase churn from the run's churn model (None: everyone, always)."""
    model = sim.churn_model
    churn = events.Churn(model.update_fraction, model.aggregate_fraction, model.dropout,
                         model.dropout_timing)
    return None if churn == events.Churn() else churn


class Rows:
    """The timeline cut into rows of `row_every_s` simulated seconds, and the device waves of
    each row (the wave count runs on across rows: it keys the attackers' draws)."""

    def __init__(self, timeline: events.Timeline, row_every_s: float):
        self.timeline, self.row_every_s = timeline, row_every_s
        self.waves_before = 0

    def end(self, k: int) -> float:
        return (k + 1) * self.row_every_s

    def ops(self, k: int) -> tuple[list, list[events.Wave]]:
        """Row k's operations (completion order) and its device waves."""
        end = self.end(k)
        ops = self.timeline.advance(end * (1 + _TIME_TOLERANCE) + _TIME_TOLERANCE)
        device = [op for op in ops if not (isinstance(op, events.Mix) and len(op.peers) < 2)]
        row_waves = events.waves(device)
        return ops, row_waves


def train(run, progress, recorder) -> None:
    """The asynchronous loop: row after row of simulated time (see the module docstring)."""
    from marfl_jax import runner  # The runner's evaluation and checkpoints (it imports this).

    config, sim = run.config, run.sim
    n = config.num_peers
    steps: WaveSteps = run.steps
    timeline = make_timeline(
        sim, window_s=config.matchmaking_window_s,
        group_size=2 if config.algorithm == "gossip" else config.group_size,
        has_data=np.asarray(run.data.counts) > 0, churn=churn_of(sim), seed=config.seed)
    rows = Rows(timeline, config.row_every_s)
    honest = (np.ones(n, bool) if sim.adversary is None else sim.adversary.honest)
    budget = config.max_iterations * n
    phases = 0
    for k in range(progress.first_iteration):  # Replay to the checkpoint's row.
        ops, row_waves = rows.ops(k)
        rows.waves_before += len(row_waves)
        phases += sum(isinstance(op, events.Train) for op in ops)
    loop_start = time.time()
    while progress.reached_at is None and phases < budget:  # A finished run writes no row.
        k = progress.t
        ops, row_waves = rows.ops(k)
        state, losses = progress.state, []
        for w, wave in enumerate(row_waves):
            if wave.mixes:
                state = steps.mix(state, wave.mixes, rows.waves_before + w)
            if wave.trains:
                state, loss = steps.train(state, wave.trains)
                losses.append(loss)
        progress.state = state
        rows.waves_before += len(row_waves)
        trains = [op for op in ops if isinstance(op, events.Train)]
        phases += len(trains)
        final = phases >= budget
        row = _row(run, progress, recorder, k, ops, row_waves, losses, phases, honest,
                   timeline, rows.end(k))
        evaluating = k % config.eval_every == 0 or final
        if evaluating:
            runner.evaluate(run, progress, row, k)  # Over the online (honest) peers.
        recorder.finish(row)
        if progress.diverged:
            break
        progress.t += 1
        if evaluating:
            _log(run, row, phases, budget, loop_start, k - progress.first_iteration + 1)
            if row["accuracy"] >= config.target_accuracy:
                progress.reached_at = k
        checkpointing = config.checkpoint_every and progress.t % config.checkpoint_every == 0
        if progress.reached_at is not None or final or checkpointing:
            runner.save_checkpoint(progress, recorder)
        if final:
            break
    recorder.close()


def _row(run, progress, recorder, k, ops, row_waves, losses, phases, honest, timeline,
         end) -> dict:
    n = run.config.num_peers
    mixes = [op for op in ops if isinstance(op, events.Mix)]
    trains = [op for op in ops if isinstance(op, events.Train)]
    sizes = ledger_rounds(mixes, n)
    groups = [m for m in mixes if len(m.peers) > 1]
    present = sizes.max(axis=0, initial=0) > 0
    online = ~timeline.sitting_out
    loss = float(sum(float(x) for x in jax.device_get(losses)))
    consensus, finite = jax.device_get(run.steps.observe(progress.state.params,
                                                         jnp.asarray(online & honest)))
    row = {"iteration": k, **progress.ledger.record(sizes),
           "present_peers": int(present.sum()),
           "mean_group_size": comm.mean_group_size(sizes),
           "updating_peers": len(trains),
           "train_loss": loss / max(len(trains), 1),
           "consensus_after": float(consensus),
           "sim_seconds": run.config.row_every_s,
           "cumulative_sim_seconds": end,
           "local_phases": len(trains), "cumulative_local_phases": phases,
           "groups": len(groups), "alone": len(mixes) - len(groups),
           "waves": len(row_waves),
           "wave_size_mean": (float(np.mean([w.size for w in row_waves])) if row_waves
                              else 0.0),
           "staleness_mean": (float(np.mean([m.staleness for m in groups])) if groups
                              else 0.0),
           "staleness_max": max((m.staleness for m in groups), default=0)}
    if not finite:
        row["params_finite"] = False
    recorder.sim_elapsed = end
    row["present"] = online
    return row


def _log(run, row, phases, budget, loop_start, rows_done) -> None:
    rate = rows_done / max(time.time() - loop_start, 1e-9)
    logging.info("row %d | %.4g s simulated | local phases %d/%d | accuracy %.4f | loss %.4f | "
                 "staleness %.2f (max %d) | %.3g rows/s", row["iteration"],
                 row["cumulative_sim_seconds"], phases, budget, row["accuracy"], row["loss"],
                 row["staleness_mean"], row["staleness_max"], rate)
