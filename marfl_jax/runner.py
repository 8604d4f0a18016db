"""The runner: one run on the host around the pure simulation of `marfl_jax.core`.

    run(config, workdir) -> RunResult

`marfl_jax.assemble` builds the run's pieces (data, plan, model, Simulation, ledger, clock,
accountant, compiled steps); the runner resumes from the last checkpoint, then loops: one
jitted iteration, the ledger's exact bytes, evaluation on schedule, one row appended to
metrics.jsonl, a checkpoint every `--checkpoint_every` iterations. Every random draw is a
function of the seed and the iteration, so a resumed run rewrites the rows after its checkpoint
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from marfl_jax import (
    accounting,
    asynchronous,
    comm,
    evaluation,
    runtime,
    sharding,
    tracking,
    watch,
)
from marfl_jax import workdir as files
from marfl_jax.assemble import Run, assemble, initial_state
from marfl_jax.config import Config
from marfl_jax.core import FLState, Simulation


class RunResult(NamedTuple):
    summary: dict
    metrics: list[dict]
    state: FLState | None = None  # The final state (peer axis first).


def format_bytes(n: int) -> str:
    """Human-readable decimal bytes: 1.234 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n} B" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1000
    raise AssertionError


def run(config: Config, workdir: str | None = None) -> RunResult:
    """Runs (or resumes) the experiment described by `config`, writing its outputs to `workdir`
    (default `config.workdir`). Returns the summary, the metrics rows and the final state.

    The run holds the workdir's lock throughout (`workdir.locked`: a second run on it is refused
    at once). A non-finite train loss, evaluation loss or parameter stops it with
    `watch.DivergenceError`, after the row of the iteration that diverged and the summary are
    written. No checkpoint is written then: every checkpoint is saved only after the rows up to
    it were checked, so the latest one on disk (if any) is the last finite state saved. (The
    state before the diverging iteration is not kept: the iteration donates it.)"""
    numerics = config.settings(runtime.Settings)
    runtime.prepare_backend(numerics)  # XLA_FLAGS, before anything may start the backend.
    config.validate()  # Starts no backend (tests/test_runtime.py).
    workdir = workdir or config.workdir
    config = dataclasses.replace(config, workdir=workdir)
    with (runtime.matmul_precision(numerics),  # What this run traces; the caller's is kept.
          files.locked(workdir) if sharding.is_primary() else contextlib.nullcontext(),
          contextlib.ExitStack() as closing):  # The tracker, closed on an error too.
        start = time.time()
        previous = files.previous_config(config, workdir)
        logging.info("numerics: %s", runtime.describe(numerics))
        assembled = assemble(config, workdir, previous)
        if config.replicas > 1:
            from marfl_jax import replicas  # It builds on this module.
            return replicas.run(assembled, previous, start, closing)
        progress = resume(assembled, previous)
        start -= progress.elapsed_before
        recorder = Recorder(assembled.sim, progress, config.learning_rate, start,
                            *outputs(assembled, progress, closing))
        (asynchronous.train if config.asynchronous else train)(assembled, progress, recorder)
        return summarize(assembled, progress, recorder)


class Progress:
    """Where the run stands on the host: the state, the next iteration, the ledger's and the
    accountant's totals, the rows so far and the iteration that reached the target."""

    def __init__(self, state: FLState, first_iteration: int, elapsed_before: float, ledger,
                 accountant, metrics: list[dict], target_accuracy: float,
                 checkpoints: files.Checkpoints):
        self.state, self.first_iteration, self.elapsed_before = (state, first_iteration,
                                                                 elapsed_before)
        self.checkpoints = checkpoints
        self.t = first_iteration
        self.ledger, self.accountant, self.metrics = ledger, accountant, metrics
        self.reached_at = next((r["iteration"] for r in metrics
                                if r.get("accuracy", -1.0) >= target_accuracy), None)
        self.diverged: str | None = None  # The message, once a row is not finite.


def resume(run: Run, previous) -> Progress:
    """Writes the plan and config to the workdir, then restores the last checkpoint and the
    rows before it, if any. (In a multi-process run the first process writes the files; the
    barriers keep the others from reading a file being rewritten.)"""
    config, workdir = run.config, run.workdir
    checkpoints = write_run_files(run)
    ledger, accountant = run.ledger, run.accountant
    if previous is not None and checkpoints.latest() is not None:
        leaves, host = checkpoints.restore(run.abstract_state, run.mesh,
                                           older=state_before_stages(run.abstract_state))
        state, first_iteration, elapsed = FLState(*leaves), host["iteration"], host["elapsed"]
        ledger = ledger.restore(host["ledger"])
        if accountant is not None:
            accountant = accounting.PrivacyAccountant.from_state(
                config.num_peers, config.dp_noise_multiplier, config.privacy_delta,
                host["privacy"])
        logging.info("resuming %s after iteration %d", workdir, first_iteration - 1)
    else:
        state = initial_state(config, run.model, run.sim, run.test_images[:1], run.mesh)
        first_iteration, elapsed = 0, 0.0
    metrics = files.read_rows(os.path.join(workdir, "metrics.jsonl"), first_iteration)
    sharding.barrier("metrics read")
    return Progress(state, first_iteration, elapsed, ledger, accountant, metrics,
                    config.target_accuracy, checkpoints)


def write_run_files(run: Run) -> files.Checkpoints:
    """Writes the workdir's plan.json and config.json; returns its checkpoints."""
    sharding.barrier("workdir checked")
    if sharding.is_primary():
        os.makedirs(run.workdir, exist_ok=True)
        files.write_json(os.path.join(run.workdir, "plan.json"), run.plan.fields())
        files.write_atomically(os.path.join(run.workdir, "config.json"), run.config.to_json())
    sharding.barrier("workdir written")
    return files.Checkpoints(os.path.join(run.workdir, "checkpoints"))


class StateBeforeStages(NamedTuple):
    """FLState as checkpoints before the stages kept their states (DP's state in `privacy`)."""

    params: Any
    opt_state: Any
    available: Any
    privacy: Any = None


def state_before_stages(abstract: FLState) -> list:
    """The older layout `Checkpoints.restore` also tries, with its conversion (none where the
    run keeps a stage state that layout could not hold)."""
    if not set(abstract.stages) <= {"privacy"}:
        return []
    older = StateBeforeStages(abstract.params, abstract.opt_state, abstract.available,
                              abstract.stages.get("privacy"))
    return [(older, lambda s: FLState(s.params, s.opt_state, s.available,
                                      {} if s.privacy is None else {"privacy": s.privacy}))]


def stage_metrics(info: dict) -> dict:
    """The fields the stages' metrics give a row: every 0-d entry of `info`, converted by type
    (a float, an int or a bool); entries with a peer or round axis are the host's inputs."""
    row = {}
    for name, value in info.items():
        value = np.asarray(value)
        if value.ndim:
            continue
        if np.issubdtype(value.dtype, np.bool_):
            row[name] = bool(value)
        elif np.issubdtype(value.dtype, np.integer):
            row[name] = int(value)
        else:
            row[name] = float(value)
    return row


def outputs(run: Run, progress: Progress, closing: contextlib.ExitStack):
    """The run's metrics.jsonl and trackers (TensorBoard in WORKDIR/tb/, W&B with
    --wandb_project; closed by `closing` on an error too)."""
    primary = sharding.is_primary()
    rows = files.Rows(os.path.join(run.workdir, "metrics.jsonl"), progress.metrics,
                      write=primary)
    tracker = closing.enter_context(tracking.open(run.config, run.workdir, primary,
                                                  progress.first_iteration))
    return rows, tracker


class Recorder:
    """Iteration rows on the host: the ledger's exact bytes, the stages' metrics, the simulated
    clock's running total and the accountant's budget, appended to `progress.metrics` and, when
    given, to the rows file and the tracker (`outputs`)."""

    def __init__(self, sim: Simulation, progress: Progress, learning_rate: float,
                 start: float, rows: files.Rows | None = None, tracker=None):
        self.sim, self.progress, self.learning_rate, self.start = (sim, progress, learning_rate,
                                                                   start)
        metrics = progress.metrics
        self.sim_elapsed = metrics[-1].get("cumulative_sim_seconds", 0.0) if metrics else 0.0
        self.rows, self.tracker = rows, tracker

    def row(self, t: int, info, distilling: bool) -> dict:
        """Iteration t's row from its info (gathered to the host here). The host reads the
        group sizes (the ledger), who took part, whether the parameters stayed finite and, under
        DP, how many peers aggregated (the accountant); every other 0-d entry is a field."""
        info = dict(sharding.to_host(info))
        sizes, present = np.asarray(info["member_sizes"]), np.asarray(info["present"])
        finite, aggregating = info.pop("params_finite"), info.pop("aggregating", None)
        algorithm, progress = self.sim.algorithm, self.progress
        if sizes.max(initial=0) > algorithm.max_group_size:
            raise RuntimeError(f"a group of {sizes.max()} peers exceeds the bound of "
                               f"{algorithm.max_group_size} that the group sums "
                               "(mixing.segment_scan) and MKD's mates table assumed")
        row = {"iteration": t, **progress.ledger.record(sizes, distilled=distilling),
               "present_peers": int(present.sum()),
               "mean_group_size": comm.mean_group_size(sizes), **stage_metrics(info)}
        if not finite:
            row["params_finite"] = False  # Only in a row that diverged.
        if "sim_seconds" in row:
            self.sim_elapsed += row["sim_seconds"]
            row["cumulative_sim_seconds"] = self.sim_elapsed
        if distilling:
            distillation = self.sim.distillation
            row["distill_weight"] = 1.0 if not distillation.blend else distillation.weight(t)
        if progress.accountant is not None:
            progress.accountant.record(int(aggregating))
        if row["present_peers"] == 0 and row["updating_peers"] == 0:
            logging.info("iteration %d: no peer present; nothing trained or exchanged", t)
        row["present"] = present  # Popped before the row is written.
        return row

    def finish(self, row: dict) -> None:
        """Writes a row; stops the run (`progress.diverged`) when it is not finite."""
        row.pop("present")
        row["seconds"] = round(time.time() - self.start, 3)
        self.progress.metrics.append(row)
        if self.rows is not None:
            self.rows.append(row)
        if self.tracker is not None:
            self.tracker.log(row)
        self.progress.diverged = watch.divergence(row, self.learning_rate)

    def close(self) -> None:
        for output in (self.rows, self.tracker):
            if output is not None:
                output.close()


def train(run: Run, progress: Progress, recorder: Recorder) -> None:
    """The loop: one jitted iteration, then the ledger, evaluation and logging on the host.

    An iteration whose state the host does not need (no evaluation, no checkpoint after it) is
    recorded only after the next one is dispatched, so the device never waits for the host's
    bookkeeping; rows are the same either way."""
    config, steps = run.config, run.steps
    loop_start = time.time()
    pending = None  # (t, info, distilling) of an iteration not yet recorded.
    while progress.reached_at is None and progress.t < config.max_iterations:
        t = progress.t
        progress.state, info, distilling = steps(progress.state, t)
        if pending is not None:
            recorder.finish(recorder.row(*pending))
            pending = None
            if progress.diverged:
                break
        evaluating, checkpointing = due(config, t)
        if not (evaluating or checkpointing):
            pending = (t, info, distilling)
            progress.t += 1
            continue
        row = recorder.row(t, info, distilling)
        if evaluating:
            evaluate(run, progress, row, t)
        recorder.finish(row)
        if progress.diverged:
            break  # Before any checkpoint of this state.
        progress.t += 1
        if evaluating:
            log_progress(run, progress, row, loop_start)
            if row["accuracy"] >= config.target_accuracy:
                progress.reached_at = t
        if progress.reached_at is not None or progress.t == config.max_iterations or checkpointing:
            save_checkpoint(progress, recorder)
    recorder.close()


def due(config: Config, t: int) -> tuple[bool, bool]:
    """(iteration t is evaluated, a checkpoint follows it): the loops' one schedule."""
    evaluating = t % config.eval_every == 0 or t == config.max_iterations - 1
    checkpointing = bool(config.checkpoint_every) and (t + 1) % config.checkpoint_every == 0
    return evaluating, checkpointing


def evaluate(run: Run, progress: Progress, row: dict, t: int, params=None,
             honest: np.ndarray | None = None, seed: int | None = None) -> None:
    """Adds the evaluation's fields (and DP's budget so far) to iteration t's row: over the
    peers that took part, honest ones only when there are attackers. params (leaves (N, ...)),
    honest (N,) and seed (of the evaluated sample): a replica's, else the run's."""
    present = row["present"]
    if honest is None and run.sim.adversary is not None:
        honest = run.sim.adversary.honest
    if honest is not None:
        present = present & honest
    settings = run.config.settings(evaluation.Settings)
    row.update(evaluation.evaluate(settings if seed is None else settings._replace(seed=seed),
                                   progress.state.params if params is None else params, present,
                                   t, run.evaluate_peers, run.test_images, run.test_labels))
    if progress.accountant is not None:
        row.update(progress.accountant.epsilons())


def log_progress(run: Run, progress: Progress, row: dict, loop_start: float) -> None:
    config, t = run.config, progress.t
    rate = (t - progress.first_iteration) / max(time.time() - loop_start, 1e-9)
    simulated = ("" if run.sim.clock is None else
                 f" | {row['cumulative_sim_seconds'] / 3600:.3g} h simulated")
    logging.info("iteration %d/%d | accuracy %.4f | loss %.4f | %s%s | %.3g it/s | %s", t - 1,
                 config.max_iterations, row["accuracy"], row["loss"],
                 format_bytes(row["cumulative_bytes"]), simulated, rate,
                 watch.progress(t, config.max_iterations, rate, progress.metrics,
                                config.target_accuracy))


def save_checkpoint(progress: Progress, recorder: Recorder) -> None:
    """The state after iteration t - 1 with the host's totals (rows already checked finite)."""
    accountant = progress.accountant
    progress.checkpoints.save(progress.t, progress.state, {
        "iteration": progress.t, "elapsed": time.time() - recorder.start,
        "ledger": progress.ledger.state(),
        **({} if accountant is None else {"privacy": accountant.state()})})


def summarize(run: Run, progress: Progress, recorder: Recorder) -> RunResult:
    """Writes summary.json; raises `watch.DivergenceError` for a run that diverged."""
    diverged = progress.diverged
    summary_path = os.path.join(run.workdir, "summary.json")
    summary = headline(run, progress, recorder)
    summary["wall_seconds"] = wall_time(run, progress, recorder)
    if diverged:
        latest = progress.checkpoints.latest()
        diverged += ("; no checkpoint was saved" if latest is None else
                     f"; the latest checkpoint (after iteration {latest - 1}) holds a finite state")
        summary["diverged"] = diverged
    if sharding.is_primary():
        files.write_json(summary_path, summary)
    if diverged:
        raise watch.DivergenceError(diverged)
    logging.info("done: %s", summary)
    return RunResult(summary, progress.metrics, progress.state)


def wall_time(run: Run, progress, recorder: Recorder) -> float:
    """The run's wall seconds: a finished run restored again keeps the time it took then."""
    wall_seconds = round(time.time() - recorder.start, 3)
    finished_before = (files.read_json(os.path.join(run.workdir, "summary.json"))
                       if progress.t == progress.first_iteration and not progress.diverged
                       else None)
    if finished_before is not None:
        wall_seconds = finished_before.get("wall_seconds", wall_seconds)
    return wall_seconds


def headline(run: Run, progress: Progress, recorder: Recorder) -> dict:
    """The summary's figures of one run (or one replica) from its rows and totals."""
    config, metrics, reached_at = run.config, progress.metrics, progress.reached_at
    evaluated = [r for r in metrics if "accuracy" in r]
    summary = {
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "iterations": len(metrics),
        "cumulative_bytes": progress.ledger.cumulative_bytes,
        "reached_target": reached_at is not None,
        "target_accuracy": config.target_accuracy,
        "iteration_reached_target": reached_at,
        "bytes_to_target": (metrics[reached_at]["cumulative_bytes"]
                            if reached_at is not None else None),
    }
    if run.sim.clock is not None:
        summary.update(cumulative_sim_seconds=recorder.sim_elapsed,
                       sim_seconds_to_target=(metrics[reached_at]["cumulative_sim_seconds"]
                                              if reached_at is not None else None))
    if progress.accountant is not None:
        summary.update(dp_delta=config.privacy_delta, **progress.accountant.epsilons())
    return summary
