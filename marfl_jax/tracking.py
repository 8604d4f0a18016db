"""Where a run's rows go besides metrics.jsonl: TensorBoard event files (always; tensorboardX,
no TensorFlow) and Weights & Biases (`--wandb_project`).

    tracker = tracking.open(config, workdir, primary, first_iteration)
    tracker.log(row)  # every finite number of the row, at step row["iteration"]
    tracker.close()   # also a context manager: `with tracking.open(...) as tracker:`

TensorBoard's files go to `WORKDIR/tb/` (`tensorboard --logdir runs` shows every run under
runs/): one scalar per numeric field of each row, the config as text (`config`, its JSON) and as
an hparams session (its fields). A resumed run rewrites the rows after its checkpoint: it opens
the writer with `purge_step=first_iteration`, so its events supersede the old ones from that
step on. Only the primary process writes (the others get a tracker that does nothing).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
from typing import Protocol

import numpy as np

from marfl_jax.config import Config, ConfigError, wandb_missing

__all__ = ["TB_DIR", "TensorBoard", "Tracker", "WandB", "open", "scalars"]

TB_DIR = "tb"  # Under the workdir.
# The hparams session's metrics: the scalar tags the hparams dashboard shows beside the config.
HPARAMS_METRICS = ("accuracy", "loss", "train_loss", "cumulative_bytes")
FLUSH_SECONDS = 10  # Each flush fsyncs the event file: not once per row.


def scalars(row: dict) -> dict[str, float]:
    """The row's finite numbers (bools, ints, floats, numpy scalars) as floats, without the step
    ("iteration"); other values (strings, arrays, NaN, inf) are left out."""
    values = {}
    for name, value in row.items():
        if name == "iteration" or not isinstance(value, (numbers.Real, np.bool_)):
            continue
        value = float(value)
        if math.isfinite(value):
            values[name] = value
    return values


class Backend(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, finished: bool) -> None: ...


class TensorBoard:
    """Event files in `logdir`, written by tensorboardX's SummaryWriter."""

    def __init__(self, config: Config, logdir: str, first_iteration: int = 0):
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        # purge_step: TensorBoard hides the events at steps >= first_iteration written before.
        # The suffix: tensorboardX names files by the second and truncates an existing one, so
        # a run resumed within the second would otherwise erase the events it resumes after.
        self._writer = SummaryWriter(logdir, purge_step=first_iteration,
                                     flush_secs=FLUSH_SECONDS,
                                     filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        text = "\n".join("    " + line for line in config.to_json().splitlines())  # Markdown code.
        self._writer.add_text("config", text, first_iteration)
        fields = {name: value for name, value in dataclasses.asdict(config).items()
                  if isinstance(value, (bool, int, float, str))}
        experiment, session_start, self._session_end = hparams(
            fields, dict.fromkeys(HPARAMS_METRICS, 0.0))
        for summary in (experiment, session_start):
            self._writer.file_writer.add_summary(summary, first_iteration)

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def close(self, finished: bool) -> None:
        if finished:  # The hparams session ends (status success) only with the run's end.
            self._writer.file_writer.add_summary(self._session_end)
        self._writer.close()


class WandB:
    """A W&B run in project `config.wandb_project` (wandb is imported only here)."""

    def __init__(self, config: Config, workdir: str):
        try:
            import wandb
        except ImportError as error:
            raise ConfigError(wandb_missing(config.wandb_project)) from error
        self._run = wandb.init(project=config.wandb_project, config=dataclasses.asdict(config),
                               name=os.path.basename(os.path.normpath(workdir)), dir=workdir)

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self, finished: bool) -> None:
        self._run.finish(exit_code=0 if finished else 1)


class Tracker:
    """Sends each row to every backend; `close()` (or leaving the `with` block) closes them."""

    def __init__(self, backends: list[Backend]):
        self._backends = backends

    def log(self, row: dict) -> None:
        values = scalars(row)
        for backend in self._backends:
            backend.log(int(row["iteration"]), values)

    def close(self, finished: bool = True) -> None:
        """Closes every backend once (again: nothing). finished=False: the run stopped on an
        error (the hparams session and the W&B run are not marked successful)."""
        backends, self._backends = self._backends, []
        error = None
        for backend in backends:
            try:
                backend.close(finished)
            except Exception as e:  # The others still close; the first error is raised.
                error = error or e
        if error is not None:
            raise error

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(finished=exc_type is None)


def open(config: Config, workdir: str, primary: bool = True,
         first_iteration: int = 0) -> Tracker:
    """The run's tracker: TensorBoard under WORKDIR/tb/, and W&B with --wandb_project; a tracker
    that does nothing on a non-primary process. first_iteration: the resumed run's first step
    (0 for a fresh run)."""
    if not primary:
        return Tracker([])
    backends: list[Backend] = []
    if config.wandb_project:
        backends.append(WandB(config, workdir))
    try:
        backends.append(TensorBoard(config, os.path.join(workdir, TB_DIR), first_iteration))
    except BaseException:
        Tracker(backends).close(finished=False)
        raise
    return Tracker(backends)
