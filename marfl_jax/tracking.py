"""Where a run's rows go besides metrics.jsonl: TensorBoard event files (no TensorFlow) and
Weights & Biases (`--wandb_project`).

    tracker = tracking.open(config, workdir, primary, first_iteration)
    tracker.log(row)  # every finite number of the row, at step row["iteration"]
    tracker.close()   # also a context manager: `with tracking.open(...) as tracker:`

TensorBoard's files go to `WORKDIR/tb/` (`tensorboard --logdir runs` shows every run under
runs/): one scalar per numeric field of each row, the config as text (`config`, its JSON) and as
an hparams session (its fields). A resumed run rewrites the rows after its checkpoint: it opens
the writer with `purge_step=first_iteration`, so its events supersede the old ones from that
step on. Only the primary process writes (the others get a tracker that does nothing).

The event files are written by tensorboardX when it is installed (requirements.txt), else by
the `tensorboard` package's own event writer (`tensorboard.summary.writer`, which needs no
TensorFlow: the same events, protos and file framing), else not at all: one warning line (once
per process) says so and the run goes on (metrics.jsonl holds every row either way).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
from typing import Protocol

import numpy as np
from absl import logging

from marfl_jax.config import Config, ConfigError, installed, wandb_missing

__all__ = ["TB_DIR", "TensorBoard", "Tracker", "WandB", "event_writer", "open", "scalars"]

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


WRITERS = ("tensorboardX", "tensorboard")  # Tried in this order.
MISSING_WRITER = ("TensorBoard files are not written: neither tensorboardX nor tensorboard is "
                  "installed (pip install tensorboardX; metrics.jsonl has every row)")
_warned_missing_writer = False


def event_writer() -> str | None:
    """The package that writes the event files here (a name in WRITERS), or None."""
    if installed("tensorboardX"):
        return "tensorboardX"
    if not installed("tensorboard"):
        return None
    try:  # Its event writer and protos (protobuf); TensorFlow is not needed.
        from tensorboard.summary.writer import event_file_writer  # noqa: F401
    except ImportError:
        return None
    return "tensorboard"


class TensorBoard:
    """Event files in `logdir`, written by tensorboardX's SummaryWriter, or by tensorboard's own
    event writer (`writer="tensorboard"`, `_NativeWriter`)."""

    def __init__(self, config: Config, logdir: str, first_iteration: int = 0,
                 writer: str = "tensorboardX"):
        if writer == "tensorboardX":
            from tensorboardX import SummaryWriter
            from tensorboardX.summary import hparams
        elif writer == "tensorboard":
            SummaryWriter, hparams = _NativeWriter, _native_hparams
        else:
            raise ValueError(f"writer={writer!r}: choose one of {', '.join(WRITERS)}")
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


class _NativeWriter:
    """The part of tensorboardX's SummaryWriter this module uses, on the `tensorboard` package's
    event writer (no TensorFlow): the events tensorboardX writes, field for field."""

    def __init__(self, logdir: str, purge_step: int, flush_secs: float, filename_suffix: str):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2 = event_pb2
        os.makedirs(logdir, exist_ok=True)
        self._events = EventFileWriter(logdir, flush_secs=flush_secs,
                                       filename_suffix=filename_suffix)
        self.file_writer = self  # tensorboardX's `writer.file_writer.add_summary`.
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        for event in (event_pb2.Event(step=purge_step, file_version="brain.Event:2"),
                      event_pb2.Event(step=purge_step, session_log=start)):
            event.wall_time = time.time()
            self._events.add_event(event)

    def add_summary(self, summary, global_step: int | None = None) -> None:
        event = self._event_pb2.Event(wall_time=time.time(), summary=summary)
        if global_step is not None:
            event.step = int(global_step)
        self._events.add_event(event)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto import summary_pb2

        self.add_summary(summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=tag, simple_value=float(value))]), step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2
        from tensorboard.plugins.text import plugin_data_pb2

        plugin = summary_pb2.SummaryMetadata.PluginData(
            plugin_name="text", content=plugin_data_pb2.TextPluginData(version=0)
            .SerializeToString())
        tensor = tensor_pb2.TensorProto(
            dtype="DT_STRING", string_val=[text.encode()],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
        self.add_summary(summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=tag + "/text_summary", metadata=summary_pb2.SummaryMetadata(plugin_data=plugin),
            tensor=tensor)]), step)

    def close(self) -> None:
        self._events.close()


def _native_hparams(fields: dict, metrics: dict):
    """tensorboardX.summary.hparams's three summaries (experiment, session start, session end)
    from the `tensorboard` package's protos."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    def summary(tag, **content):
        data = plugin_data_pb2.HParamsPluginData(version=0, **content).SerializeToString()
        metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name="hparams", content=data))
        return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=metadata)])

    start = plugin_data_pb2.SessionStartInfo()
    infos = []
    for name, value in fields.items():
        if isinstance(value, str):
            start.hparams[name].string_value = value
            kind = "DATA_TYPE_STRING"
        elif isinstance(value, bool):
            start.hparams[name].bool_value = value
            kind = "DATA_TYPE_BOOL"
        else:
            start.hparams[name].number_value = float(value)
            kind = "DATA_TYPE_FLOAT64"
        infos.append(api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(kind)))
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics])
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value("STATUS_SUCCESS"))
    return (summary("_hparams_/experiment", experiment=experiment),
            summary("_hparams_/session_start_info", session_start_info=start),
            summary("_hparams_/session_end_info", session_end_info=end))


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
    writer = event_writer()
    if writer is None:
        global _warned_missing_writer
        if not _warned_missing_writer:  # Once per process (a sweep opens many trackers).
            _warned_missing_writer = True
            logging.warning(MISSING_WRITER)
        return Tracker(backends)
    try:
        backends.append(TensorBoard(config, os.path.join(workdir, TB_DIR), first_iteration,
                                    writer))
    except BaseException:
        Tracker(backends).close(finished=False)
        raise
    return Tracker(backends)
