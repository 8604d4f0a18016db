"""--replicas=R: the host side of R independent replicas run as one program.

    run(assembled, previous, start, closing) -> RunResult

The device runs the R replicas' iterations in one compiled step (`marfl_jax.core.replica_axis`:
replica r is the run of --seed + r). The host keeps, per replica, what a single run keeps: its
ledger, privacy accountant, simulated seconds, rows, the iteration that reached the target and
whether it diverged (a `runner.Progress` without a state, with its `runner.Recorder`). It writes

- metrics_replicas.jsonl: one line per iteration, {"iteration": t, "replicas": [row, ...]},
  replica r's row being the row of the single run with --seed + r (null once it diverged);
- metrics.jsonl: one row per iteration, each numeric field's mean over the replicas still
  running and `<field>_std`, their sample standard deviation (ddof 1); a single run's spread
  over the evaluated peers, `accuracy_std`, is `accuracy_peer_std` here (its mean over the
  replicas); `replicas` counts the replicas in the row;
- summary.json: each headline figure's mean, `_std` and `_ci95` (a 95 % Student t interval
  of the mean over the replicas), the replicas that reached the target, and every replica's
  own summary under `replica_summaries`.

A replica that diverges stops alone: its diverging row is its last, it leaves the means, and
the summary names it; the run stops (`watch.DivergenceError`) when every replica has. The run
ends when every replica still running has reached --target_accuracy, or at --max_iterations.
Checkpoints hold the stacked state and each replica's totals: a resumed run rewrites the rows
after its checkpoint exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time

import jax
import numpy as np
from absl import logging

from marfl_jax import accounting, sharding, watch
from marfl_jax import runner as runner_lib
from marfl_jax import workdir as files
from marfl_jax.assemble import Run, initial_state, replica_seeds
from marfl_jax.core import FLState

ROWS_FILE = "metrics_replicas.jsonl"

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(degrees_of_freedom: int) -> float:
    """Student's t 97.5 % quantile (beyond 30 degrees of freedom, its Cornish-Fisher
    expansion around the normal's 1.96 to second order, within 1e-3)."""
    if degrees_of_freedom < 1:
        raise ValueError("an interval needs two values or more")
    if degrees_of_freedom <= len(_T975):
        return _T975[degrees_of_freedom - 1]
    z, nu = 1.959964, degrees_of_freedom
    return z + (z ** 3 + z) / (4 * nu) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * nu ** 2)


def interval(values) -> dict:
    """mean, std (ddof 1) and the 95 % t interval of the mean of `values` (finite numbers);
    std and interval None with fewer than two values, everything None with none."""
    x = np.asarray([v for v in values if v is not None], np.float64)
    if x.size == 0:
        return {"mean": None, "std": None, "ci95": None}
    mean = float(x.mean())
    if x.size < 2:
        return {"mean": mean, "std": None, "ci95": None}
    std = float(x.std(ddof=1))
    half = t_quantile_975(x.size - 1) * std / math.sqrt(x.size)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def combine_rows(rows: list[dict], t: int) -> dict:
    """Iteration t's row of the replicas' rows (module docstring): each numeric field's mean
    and `_std` (ddof 1; 0 for one replica); a field equal in every row keeps its value."""
    combined: dict = {"iteration": t, "replicas": len(rows)}
    names = list(dict.fromkeys(name for row in rows for name in row))
    for name in names:
        if name in ("iteration", "seconds"):
            continue
        values = [row[name] for row in rows if name in row]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            combined[name] = all(values) if all(isinstance(v, bool) for v in values) else None
            continue
        spread = name.endswith("_std")  # The evaluated peers' spread within each replica.
        key = name[:-len("_std")] + "_peer_std" if spread else name
        x = np.asarray(values, np.float64)
        combined[key] = values[0] if all(v == values[0] for v in values) else float(x.mean())
        if not spread:
            combined[name + "_std"] = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return combined


class ReplicaProgress:
    """Where R replicas stand on the host: the stacked state, the next iteration, the combined
    rows, and each replica's `runner.Progress` (no state) in `lanes`."""

    def __init__(self, state: FLState, first_iteration: int, elapsed_before: float,
                 lanes: list[runner_lib.Progress], metrics: list[dict],
                 replica_lines: list[dict], checkpoints: files.Checkpoints):
        self.state, self.first_iteration, self.elapsed_before = (state, first_iteration,
                                                                 elapsed_before)
        self.t, self.lanes, self.metrics = first_iteration, lanes, metrics
        self.replica_lines, self.checkpoints = replica_lines, checkpoints
        self.reached_at: int | None = None  # Once every replica running reached the target.
        self.diverged: str | None = None  # Once every replica diverged.
        self._update_status()

    def running(self) -> list[int]:
        """The replicas that have not diverged."""
        return [r for r, lane in enumerate(self.lanes) if not lane.diverged]

    def _update_status(self) -> None:
        running = self.running()
        if not running:
            self.diverged = "every replica diverged: " + "; ".join(
                f"replica {r}: {lane.diverged}" for r, lane in enumerate(self.lanes))
        elif self.metrics and all(self.lanes[r].reached_at is not None for r in running):
            self.reached_at = self.metrics[-1]["iteration"]


def resume(run: Run, previous) -> ReplicaProgress:
    """`runner.resume` for replicas: the stacked state and every replica's totals and rows."""
    config, workdir = run.config, run.workdir
    checkpoints = runner_lib.write_run_files(run)
    replicas = config.replicas
    ledgers = [dataclasses.replace(run.ledger) for _ in range(replicas)]  # Each its own totals.
    accountants = [run.accountant] * replicas  # None, or replaced below.
    diverged = [None] * replicas
    if previous is not None and checkpoints.latest() is not None:
        leaves, host = checkpoints.restore(run.abstract_state, run.mesh)
        state, first_iteration, elapsed = FLState(*leaves), host["iteration"], host["elapsed"]
        lanes_host = host["replicas"]
        ledgers = [run.ledger.restore(lane["ledger"]) for lane in lanes_host]
        if run.accountant is not None:
            accountants = [accounting.PrivacyAccountant.from_state(
                config.num_peers, config.dp_noise_multiplier, config.privacy_delta,
                lane["privacy"]) for lane in lanes_host]
        diverged = [lane.get("diverged") for lane in lanes_host]
        logging.info("resuming %s after iteration %d", workdir, first_iteration - 1)
    else:
        state = initial_state(config, run.model, run.sim, run.test_images[:1])
        first_iteration, elapsed = 0, 0.0
        if run.accountant is not None:
            accountants = [accounting.PrivacyAccountant(
                config.num_peers, config.dp_noise_multiplier, config.privacy_delta)
                for _ in range(replicas)]
    metrics = files.read_rows(os.path.join(workdir, "metrics.jsonl"), first_iteration)
    lines = files.read_rows(os.path.join(workdir, ROWS_FILE), first_iteration)
    lanes = []
    for r in range(replicas):
        rows = [line["replicas"][r] for line in lines if line["replicas"][r] is not None]
        lane = runner_lib.Progress(None, first_iteration, elapsed, ledgers[r], accountants[r],
                                   rows, config.target_accuracy, checkpoints)
        lane.diverged = diverged[r]
        lanes.append(lane)
    return ReplicaProgress(state, first_iteration, elapsed, lanes, metrics, lines, checkpoints)


def run(assembled: Run, previous, start: float, closing: contextlib.ExitStack
        ) -> runner_lib.RunResult:
    """Resumes, trains and summarizes the replicas of `assembled` (`runner.run`'s part for
    --replicas > 1; the workdir is locked and the backend set up by it)."""
    config = assembled.config
    progress = resume(assembled, previous)
    start -= progress.elapsed_before
    rows, tracker = runner_lib.outputs(assembled, progress, closing)
    replica_rows = files.Rows(os.path.join(assembled.workdir, ROWS_FILE), progress.replica_lines,
                              write=sharding.is_primary())
    recorders = [runner_lib.Recorder(assembled.sim, lane, config.learning_rate, start)
                 for lane in progress.lanes]
    try:
        train(assembled, progress, recorders, start, (rows, replica_rows, tracker))
    finally:
        for output in (rows, replica_rows, tracker):
            output.close()
    return summarize(assembled, progress, recorders, start)


def train(run: Run, progress: ReplicaProgress, recorders: list[runner_lib.Recorder],
          start: float, outputs) -> None:
    """`runner.train` over the replicas: one jitted step of all of them, then each replica's
    row (as its single run would write it) and the combined row."""
    config, steps = run.config, run.steps
    byzantine = (None if run.replica_inputs.byzantine is None
                 else np.asarray(run.replica_inputs.byzantine))
    seeds = replica_seeds(config)
    loop_start = time.time()
    pending = None  # (t, info, distilling) of an iteration not yet recorded.
    while (progress.reached_at is None and progress.diverged is None
           and progress.t < config.max_iterations):
        t = progress.t
        progress.state, info, distilling = steps(progress.state, t)
        if pending is not None:
            record(run, progress, recorders, *pending, False, byzantine, seeds, start, outputs)
            pending = None
            if progress.diverged:
                break
        evaluating, checkpointing = runner_lib.due(config, t)
        if not (evaluating or checkpointing):
            pending = (t, info, distilling)
            progress.t += 1
            continue
        row = record(run, progress, recorders, t, info, distilling, evaluating, byzantine, seeds,
                     start, outputs)
        if progress.diverged:
            break
        progress.t += 1
        if evaluating:
            log_progress(run, progress, row, loop_start)
        if (progress.reached_at is not None or progress.t == config.max_iterations
                or checkpointing):
            save_checkpoint(progress, start)


def record(run: Run, progress: ReplicaProgress, recorders, t: int, info, distilling: bool,
           evaluating: bool, byzantine, seeds, start: float, outputs) -> dict:
    """Iteration t's rows: each running replica's, then the combined one; written out."""
    rows_file, replica_rows_file, tracker = outputs
    info = sharding.to_host(info)
    line, finished = [], []
    for r, (lane, recorder) in enumerate(zip(progress.lanes, recorders, strict=True)):
        if lane.diverged:
            line.append(None)
            continue
        row = recorder.row(t, {name: value[r] for name, value in info.items()}, distilling)
        if evaluating:
            params = jax.tree.map(lambda x, r=r: x[r], progress.state.params)
            runner_lib.evaluate(run, lane, row, t, params=params,
                                honest=None if byzantine is None else ~byzantine[r],
                                seed=seeds[r])
        recorder.finish(row)
        if evaluating and lane.reached_at is None and row["accuracy"] >= (
                run.config.target_accuracy):
            lane.reached_at = t
        if lane.diverged:
            logging.warning("replica %d (seed %d) diverged at iteration %d: %s", r, seeds[r], t,
                            lane.diverged)
        else:
            finished.append(row)
        line.append(row)
    combined = combine_rows(finished, t) if finished else {"iteration": t, "replicas": 0}
    diverged = sum(1 for lane in progress.lanes if lane.diverged)
    if diverged:
        combined["diverged_replicas"] = diverged
    combined["seconds"] = round(time.time() - start, 3)
    entry = {"iteration": t, "replicas": line}
    progress.replica_lines.append(entry)
    replica_rows_file.append(entry)
    progress.metrics.append(combined)
    rows_file.append(combined)
    tracker.log(combined)
    progress._update_status()
    return combined


def log_progress(run: Run, progress: ReplicaProgress, row: dict, loop_start: float) -> None:
    config, t = run.config, progress.t
    rate = (t - progress.first_iteration) / max(time.time() - loop_start, 1e-9)
    logging.info("iteration %d/%d | %d replicas | accuracy %.4f +- %.4f | %.3g it/s | %s",
                 t - 1, config.max_iterations, row["replicas"], row.get("accuracy", math.nan),
                 row.get("accuracy_std", math.nan), rate,
                 watch.progress(t, config.max_iterations, rate, progress.metrics,
                                config.target_accuracy))


def save_checkpoint(progress: ReplicaProgress, start: float) -> None:
    """The stacked state after iteration t - 1 with every replica's totals."""
    progress.checkpoints.save(progress.t, progress.state, {
        "iteration": progress.t, "elapsed": time.time() - start,
        "replicas": [{"ledger": lane.ledger.state(), "diverged": lane.diverged,
                      **({} if lane.accountant is None else
                         {"privacy": lane.accountant.state()})} for lane in progress.lanes]})


# The summary's headline figures that get a mean, _std and _ci95 over the replicas.
SUMMARIZED = ("final_accuracy", "best_accuracy", "cumulative_bytes", "iteration_reached_target",
              "bytes_to_target", "cumulative_sim_seconds", "sim_seconds_to_target", "epsilon_rdp",
              "epsilon_pld")


def summarize(run: Run, progress: ReplicaProgress, recorders, start: float
              ) -> runner_lib.RunResult:
    """Writes summary.json (module docstring); raises `watch.DivergenceError` when every
    replica diverged."""
    config = run.config
    seeds = replica_seeds(config)
    each = []
    for r, (lane, recorder) in enumerate(zip(progress.lanes, recorders, strict=True)):
        summary = {"replica": r, "seed": seeds[r], **runner_lib.headline(run, lane, recorder)}
        if lane.diverged:
            summary["diverged"] = lane.diverged
        each.append(summary)
    running = [s for s in each if "diverged" not in s]
    reached = [s for s in running if s["reached_target"]]
    summary = {"replicas": config.replicas, "iterations": len(progress.metrics),
               "target_accuracy": config.target_accuracy,
               "reached_target": bool(running) and len(reached) == len(running),
               "replicas_reached_target": len(reached)}
    for name in SUMMARIZED:
        if not any(name in s for s in each):
            continue
        stats = interval(s.get(name) for s in running)
        summary.update({name: stats["mean"], f"{name}_std": stats["std"],
                        f"{name}_ci95": stats["ci95"]})
    # A recorder's start is the run's: any one gives the wall time.
    summary["wall_seconds"] = runner_lib.wall_time(run, progress, recorders[0])
    diverged = [s for s in each if "diverged" in s]
    if diverged:
        summary["diverged_replicas"] = [{"replica": s["replica"], "seed": s["seed"],
                                         "diverged": s["diverged"]} for s in diverged]
    summary["replica_summaries"] = each
    if progress.diverged:
        summary["diverged"] = progress.diverged
    if sharding.is_primary():
        files.write_json(os.path.join(run.workdir, "summary.json"), summary)
    if progress.diverged:
        raise watch.DivergenceError(progress.diverged)
    logging.info("done: final accuracy %s (95 %% interval %s) over %d replicas; %d of %d "
                 "reached the target", summary.get("final_accuracy"),
                 summary.get("final_accuracy_ci95"), len(running), len(reached),
                 config.replicas)
    return runner_lib.RunResult(summary, progress.metrics, progress.state)
