"""Checkpoint and resume: a run killed with SIGKILL and rerun produces the same rows."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from marfl_jax import runner
from marfl_jax.config import Config, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=2,
                batch_size=8, eval_every=3, eval_peers="3", max_iterations=12,
                target_accuracy=1.0, checkpoint_every=2, dropout=0.3,
                availability="markov", mean_on_iterations=4.0, mean_off_iterations=2.0)


def _flags(config: Config, workdir) -> list[str]:
    skip = {"workdir", "data_dir", "conv_impl"}
    return [f"--{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
            if f.name not in skip] + [f"--workdir={workdir}"]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


@pytest.mark.slow
def test_sigkill_and_resume_reproduces_the_uninterrupted_rows(tmp_path):
    runner.run(CONFIG, str(tmp_path / "straight"))
    workdir = tmp_path / "killed"
    command = [sys.executable, "-m", "launch.train", *_flags(CONFIG, workdir)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(_rows(workdir)) < CONFIG.max_iterations
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert _rows(workdir) == _rows(tmp_path / "straight")
    with open(workdir / "summary.json") as f, open(tmp_path / "straight" / "summary.json") as g:
        killed, straight = json.load(f), json.load(g)
    assert {k: v for k, v in killed.items() if k != "wall_seconds"} == {
        k: v for k, v in straight.items() if k != "wall_seconds"}


@pytest.mark.slow
def test_finished_run_is_not_rerun_and_can_be_extended(tmp_path):
    short = dataclasses.replace(CONFIG, max_iterations=4)
    first = runner.run(short, str(tmp_path))
    again = runner.run(short, str(tmp_path))
    assert again.metrics == first.metrics
    longer = runner.run(dataclasses.replace(CONFIG, max_iterations=6), str(tmp_path))
    assert longer.metrics[:3] == first.metrics[:3]  # Rows before the last checkpoint are kept.
    assert len(longer.metrics) == 6


@pytest.mark.slow
def test_workdir_with_another_config_is_refused(tmp_path):
    runner.run(dataclasses.replace(CONFIG, max_iterations=1), str(tmp_path))
    with pytest.raises(ConfigError, match="--workdir=.* different config .*--num_peers"):
        runner.run(dataclasses.replace(CONFIG, num_peers=4, key_dim=2), str(tmp_path))
