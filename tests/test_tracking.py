"""marfl_jax.tracking: TensorBoard event files (read back here without TensorBoard: the TFRecord
framing by hand, the events with tensorboardX's protobuf) and the W&B backend (a fake wandb)."""

import dataclasses
import math
import os
import struct
import sys
import types

import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
from tensorboardX.record_writer import masked_crc32c

from marfl_jax import Config, ConfigError, runner, tracking

CONFIG = Config(model="mlp", num_peers=4, group_size=2, key_dim=2, local_batches=1, batch_size=8,
                max_iterations=3, eval_every=1, checkpoint_every=0, target_accuracy=1.0)
ROWS = [
    {"iteration": 0, "bytes": 100, "cumulative_bytes": 100, "train_loss": 2.5, "accuracy": 0.125,
     "loss": 2.25, "present_peers": 4, "note": "text", "nan_field": float("nan")},
    {"iteration": 1, "bytes": 100, "cumulative_bytes": 200, "train_loss": float("inf"),
     "flag": True, "numpy": np.float32(0.75), "array": np.zeros(3), "nan_field": 1.0},
]


def read_events(logdir: str) -> list[list[event_pb2.Event]]:
    """Each event file's events (files in name order, as TensorBoard reads them). A record: the
    data's length (8 bytes, little-endian), its masked CRC-32C, the data, the data's CRC."""
    files = []
    for name in sorted(os.listdir(logdir)):
        assert "tfevents" in name, name
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        events, offset = [], 0
        while offset < len(data):
            header = data[offset:offset + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
            assert header_crc == masked_crc32c(header)
            record = data[offset + 12:offset + 12 + length]
            (record_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
            assert record_crc == masked_crc32c(record)
            event = event_pb2.Event()
            event.ParseFromString(record)
            events.append(event)
            offset += 16 + length
        files.append(events)
    return files


def visible(files: list[list[event_pb2.Event]]) -> list[event_pb2.Event]:
    """The events TensorBoard shows: a SessionLog START at step s (a purge_step) hides the
    events before it at steps >= s."""
    shown = []
    for event in (e for events in files for e in events):
        if event.HasField("session_log") and event.session_log.status == event.session_log.START:
            shown = [e for e in shown if e.step < event.step]
        shown.append(event)
    return shown


def scalars(events) -> dict[str, list[tuple[int, float]]]:
    series = {}
    for event in events:
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                series.setdefault(value.tag, []).append((event.step, value.simple_value))
    return series


def values_of(events, tag: str) -> list:
    return [value for event in events for value in event.summary.value if value.tag == tag]


@pytest.fixture(params=tracking.WRITERS)
def writer(request, monkeypatch):
    """Each event writer in turn (tensorboard's own only where it is installed)."""
    if request.param == "tensorboard":
        pytest.importorskip("tensorboard.summary.writer.event_file_writer")
    monkeypatch.setattr(tracking, "event_writer", lambda: request.param)
    return request.param


def test_scalars_and_config_read_back(tmp_path, writer):
    with tracking.open(CONFIG, str(tmp_path), primary=True) as tracker:
        for row in ROWS:
            tracker.log(dict(row))
    events = visible(read_events(str(tmp_path / tracking.TB_DIR)))
    series = scalars(events)
    assert series["accuracy"] == [(0, 0.125)]
    assert series["bytes"] == [(0, 100.0), (1, 100.0)]
    assert series["cumulative_bytes"] == [(0, 100.0), (1, 200.0)]
    assert series["train_loss"] == [(0, 2.5)]  # inf left out.
    assert series["nan_field"] == [(1, 1.0)]  # NaN left out.
    assert series["flag"] == [(1, 1.0)] and series["numpy"] == [(1, 0.75)]
    assert not {"iteration", "note", "array"} & set(series)
    (text,) = values_of(events, "config/text_summary")
    assert '"num_peers": 4' in text.tensor.string_val[0].decode()
    (start,) = values_of(events, "_hparams_/session_start_info")
    session = HParamsPluginData.FromString(start.metadata.plugin_data.content)
    assert session.session_start_info.hparams["num_peers"].number_value == 4
    assert session.session_start_info.hparams["model"].string_value == "mlp"
    assert len(values_of(events, "_hparams_/session_end_info")) == 1


def test_a_resumed_run_supersedes_the_events_from_its_first_iteration(tmp_path, writer):
    workdir = str(tmp_path)
    with tracking.open(CONFIG, workdir) as tracker:
        for t, loss in enumerate((3.0, 2.0, 1.0)):
            tracker.log({"iteration": t, "train_loss": loss})
    with tracking.open(CONFIG, workdir, first_iteration=1) as tracker:  # Resumed after 0.
        for t, loss in ((1, 2.5), (2, 1.5)):
            tracker.log({"iteration": t, "train_loss": loss})
    files = read_events(os.path.join(workdir, tracking.TB_DIR))
    assert len(files) == 2  # The first run's file is kept (not truncated).
    assert scalars(visible(files))["train_loss"] == [(0, 3.0), (1, 2.5), (2, 1.5)]


def test_an_error_leaves_the_hparams_session_unfinished_and_other_processes_write_nothing(
        tmp_path, writer):
    with pytest.raises(RuntimeError), tracking.open(CONFIG, str(tmp_path / "run")) as tracker:
        tracker.log({"iteration": 0, "accuracy": 0.5})
        raise RuntimeError("stopped")
    events = visible(read_events(str(tmp_path / "run" / tracking.TB_DIR)))
    assert scalars(events)["accuracy"] == [(0, 0.5)]
    assert not values_of(events, "_hparams_/session_end_info")
    tracker.close()  # Again: nothing.

    with tracking.open(CONFIG, str(tmp_path / "other"), primary=False) as tracker:
        tracker.log({"iteration": 0, "accuracy": 0.5})
    assert not os.path.exists(tmp_path / "other")


def test_both_writers_write_the_same_events(tmp_path, monkeypatch):
    """tensorboard's own writer (no tensorboardX) writes tensorboardX's events, field for field
    (the wall times aside)."""
    pytest.importorskip("tensorboard.summary.writer.event_file_writer")
    written = {}
    for name in tracking.WRITERS:
        monkeypatch.setattr(tracking, "event_writer", lambda name=name: name)
        with tracking.open(CONFIG, str(tmp_path / name), first_iteration=1) as tracker:
            for row in ROWS:
                tracker.log(dict(row))
        (events,) = read_events(str(tmp_path / name / tracking.TB_DIR))
        for event in events:
            event.ClearField("wall_time")
            event.DiscardUnknownFields()  # tensorboard names itself (source_metadata).
        written[name] = [event.SerializeToString(deterministic=True) for event in events]
    assert written["tensorboard"] == written["tensorboardX"]
    assert len(written["tensorboardX"]) > 10


def test_without_a_writer_one_warning_and_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "event_writer", lambda: None)
    monkeypatch.setattr(tracking, "_warned_missing_writer", False)
    warnings = []
    monkeypatch.setattr(tracking.logging, "warning", warnings.append)
    for _ in range(2):  # A sweep's runs: one line for the process.
        with tracking.open(CONFIG, str(tmp_path)) as tracker:
            for row in ROWS:
                tracker.log(dict(row))
    assert warnings == [tracking.MISSING_WRITER]
    assert "pip install tensorboardX" in warnings[0]
    assert not os.path.exists(tmp_path / tracking.TB_DIR)


@pytest.mark.smoke
def test_a_run_writes_its_rows_to_tensorboard(tmp_path):
    result = runner.run(CONFIG, str(tmp_path))
    events = visible(read_events(str(tmp_path / tracking.TB_DIR)))
    series = scalars(events)
    for name in ("accuracy", "bytes", "cumulative_bytes", "train_loss"):
        expected = [(row["iteration"], row[name]) for row in result.metrics]
        assert [step for step, _ in series[name]] == [0, 1, 2]
        assert series[name] == [(step, pytest.approx(value, rel=1e-6))
                                for step, value in expected], name
    assert result.metrics[-1]["cumulative_bytes"] > 0
    (text,) = values_of(events, "config/text_summary")
    assert f'"workdir": "{tmp_path}"' in text.tensor.string_val[0].decode()


class FakeWandb(types.ModuleType):
    """Records wandb.init's arguments and the run's log and finish calls."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        calls = self.calls

        class Run:
            def log(self, values, step=None):
                calls.append(("log", dict(values), step))

            def finish(self, exit_code=None):
                calls.append(("finish", exit_code))

        return Run()


def test_wandb_backend_with_a_fake_module(tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    config = dataclasses.replace(CONFIG, wandb_project="marfl")
    with tracking.open(config, str(tmp_path)) as tracker:
        for row in ROWS:
            tracker.log(dict(row))
    (_, init), *logs, finish = wandb.calls
    assert init["project"] == "marfl" and init["config"] == dataclasses.asdict(config)
    assert logs == [("log", tracking.scalars(row), row["iteration"]) for row in ROWS]
    assert logs[0][1] == {"bytes": 100.0, "cumulative_bytes": 100.0, "train_loss": 2.5,
                          "accuracy": 0.125, "loss": 2.25, "present_peers": 4.0}
    assert all(math.isfinite(v) for _, values, _ in logs for v in values.values())
    assert finish == ("finish", 0)
    assert scalars(visible(read_events(str(tmp_path / tracking.TB_DIR))))["accuracy"]


@pytest.mark.smoke
def test_wandb_project_without_wandb_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import raises ImportError.
    config = dataclasses.replace(CONFIG, wandb_project="marfl")
    message = r"--wandb_project='marfl' needs wandb, which is not installed: pip install wandb"
    with pytest.raises(ConfigError, match=message):
        config.validate()
    with pytest.raises(ConfigError, match=message):
        runner.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # Refused before any work.
    with pytest.raises(ConfigError, match=message):
        tracking.open(config, str(tmp_path / "direct"))
    assert not os.path.exists(tmp_path / "direct" / tracking.TB_DIR)
    CONFIG.validate()  # Off by default: wandb never needed.
