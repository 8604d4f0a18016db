"""Tests of the launcher: flag validation before work, and the shipped flagfiles."""

import glob
import os
import re
import subprocess
import sys

import pytest
from absl import flags

import launch.train  # noqa: F401  (defines the flags)
from launch.flags import config_from_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.smoke
@pytest.mark.parametrize("flag,expected", [
    ("--num_peers=0", "--num_peers=0 is not allowed; it must be an integer >= 1"),
    ("--algorithm=sgd", "--algorithm='sgd' is not allowed; choose one of: marfl, fedavg"),
    ("--partition=random", "choose one of: iid, iid_shuffled, dirichlet"),
    ("--mkd_teacher_fraction=1.5", "--mkd_teacher_fraction=1.5 is not allowed; it must be a "
     "number in (0, 1]"),
])
def test_bad_flag_is_one_clear_line(flag, expected, tmp_path):
    result = _train(flag, f"--workdir={tmp_path}")
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)  # Refused before any work.


@pytest.mark.smoke
def test_missing_dataset_fails_fast_with_alternatives(tmp_path):
    env = dict(os.environ, MARFL_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "launch.train", "--dataset=mnist", f"--data_dir={tmp_path}",
         f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env=env)
    assert result.returncode == 2
    assert "mnist10k" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "launch/configs/*.cfg"))))
def test_flagfiles_give_valid_configs(path):
    try:
        flags.FLAGS(["train", f"--flagfile={path}"])
        config = config_from_flags().validate()
    finally:
        flags.FLAGS.unparse_flags()
    assert config.num_peers in (16, 64, 125)
    assert config.group_size ** config.key_dim == config.num_peers  # Perfect grids: exact MAR.


@pytest.mark.slow
def test_main_job_runs_briefly(tmp_path):
    result = _train("--model=mlp", "--num_peers=4", "--group_size=2", "--key_dim=2",
                    "--max_iterations=2", f"--workdir={tmp_path}", timeout=300)
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if "iteration 1/2 | accuracy" in line]
    assert progress and "it/s | ETA" in progress[0]  # The last iteration is evaluated.
    assert os.path.exists(tmp_path / "summary.json")
    # Other libraries' INFO logs (orbax's checkpoint dicts, jax's TPU probe) are off.
    for noise in ("checkpoint_manager", "libtpu", "orbax"):
        assert noise not in result.stderr, noise
    # The launcher re-executed itself with the allocator settings (Linux CPU, glibc).
    assert "process: allocator tunables on; compilation cache /" in result.stderr


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_line_and_status_3(tmp_path):
    result = _train("--model=mlp", "--num_peers=16", "--group_size=4", "--key_dim=2",
                    "--learning_rate=1e4", "--max_iterations=10", "--eval_every=2",
                    "--checkpoint_every=2", f"--workdir={tmp_path}", timeout=300)
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(r"error: iteration \d: .*: the run diverged; try a lower --learning_rate "
                        r"\(now 10000\) in another --workdir; .*", errors[0]), errors[0]
    assert os.path.exists(tmp_path / "summary.json")
