"""Tests of the studies' configs and rows, their discovery, and of `launch.compare` end to end
on a tiny sweep."""

import csv
import os
import subprocess
import sys

import pytest

from marfl_jax import experiments, runner, sweep
from marfl_jax.config import Config
from marfl_jax.experiments import codec, mkd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_module_of_the_package_is_a_study():
    names = list(experiments.studies())
    assert names == sorted(names) and {"scaling", "churn", "mkd", "dp", "network",
                                       "codec", "baselines", "text"} <= set(names)
    assert experiments.paper_names()[:7] == ("baselines", "churn", "mkd", "dp", "text",
                                             "network", "codec")
    for name, study in experiments.studies().items():
        assert study.name == name and study.fields
        assert study.section is None or (study.title and study.claim and study.summarize)


def test_compare_defaults_come_from_the_study():
    from marfl_jax import scales

    scale = scales.with_defaults(scales.SCALES["small"], experiments.get("mkd").defaults)
    (plain, *_) = experiments.get("mkd").configs(scale, "runs/mkd")
    assert (plain.model, plain.local_batches, plain.eval_every, plain.num_peers) == (
        "cnn", 4, 1, 64)
    assert scales.SCALES["small"].mnist.model == "mlp"


def test_mkd_configs_differ_only_in_mkd():
    base = Config(workdir="runs/x", mkd_iterations=3)
    configs = mkd.mkd_configs(base, [0.4, 1.0], mkd_iterations=8)
    assert [os.path.basename(c.workdir) for c in configs] == ["no_mkd", "mkd_rho0.4", "mkd_rho1"]
    assert [c.mkd for c in configs] == [False, True, True]
    assert [c.mkd_teacher_fraction for c in configs[1:]] == [0.4, 1.0]
    assert all(c.mkd_iterations == 8 for c in configs[1:])
    assert {c.num_peers for c in configs} == {base.num_peers}


def test_mkd_row_counts_bytes_to_each_threshold():
    metrics = [
        {"iteration": 0, "cumulative_bytes": 30, "mkd_bytes": 10, "accuracy": 0.3},
        {"iteration": 1, "cumulative_bytes": 60, "mkd_bytes": 10},
        {"iteration": 2, "cumulative_bytes": 80, "mkd_bytes": 0, "accuracy": 0.6},
        {"iteration": 3, "cumulative_bytes": 100, "mkd_bytes": 0, "accuracy": 0.96},
    ]
    summary = {"iterations": 4, "final_accuracy": 0.96, "best_accuracy": 0.96,
               "wall_seconds": 1.0}
    config = Config(mkd=True, workdir="runs/x/mkd_rho0.4")
    row = mkd.mkd_row(config, runner.RunResult(summary, metrics))
    assert (row["iterations_to_50"], row["bytes_to_50"]) == (3, 80)
    assert (row["iterations_to_target"], row["bytes_to_target"]) == (4, 100)
    assert row["mkd_bytes"] == 20 and row["run"] == "mkd_rho0.4"
    assert sweep.first_reaching(metrics, 0.97) is None


def _compare(study: str, workdir, *flags: str) -> list[dict]:
    """Runs `launch.compare --study=study` with the MLP and b = 1; returns its CSV's rows."""
    result = subprocess.run(
        [sys.executable, "-m", "launch.compare", f"--study={study}", "--model=mlp",
         "--local_batches=1", *flags, f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.getsize(os.path.join(workdir, f"{study}.png")) > 0
    with open(os.path.join(workdir, f"{study}.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_compare_mkd_study_writes_csv_and_plot(tmp_path):
    rows = _compare("mkd", tmp_path, "--churn_peers=8", "--max_iterations=2",
                    "--mkd_iterations=1", "--mkd_fractions=1.0", "--target_accuracy=0.99")
    assert [r["run"] for r in rows] == ["no_mkd", "mkd_rho1"]
    assert int(rows[0]["mkd_bytes"]) == 0 < int(rows[1]["mkd_bytes"])


@pytest.mark.slow
def test_compare_dp_study_reports_epsilons(tmp_path):
    rows = _compare("dp", tmp_path, "--churn_peers=16", "--max_iterations=2",
                    "--dp_noise_multipliers=0.5")
    assert [r["run"] for r in rows] == ["no_dp", "dp_z0.5"]
    assert rows[0]["epsilon_rdp"] == "" and float(rows[1]["epsilon_rdp"]) > 0
    assert float(rows[1]["epsilon_pld"]) <= float(rows[1]["epsilon_rdp"])


def test_codec_configs_cover_every_algorithm_codec_and_momentum_setting():
    base = Config(workdir="runs/x")
    one = codec.codec_configs(base, ["float32", "int8"])
    assert [os.path.basename(c.workdir) for c in one] == [
        "float32_momentum", "int8_momentum", "float32_weights", "int8_weights"]
    several = codec.codec_configs(base, ["int8"], ["fedavg", "gossip"])
    assert [os.path.basename(c.workdir) for c in several] == [
        "fedavg_int8_momentum", "fedavg_int8_weights", "gossip_int8_momentum",
        "gossip_int8_weights"]
    assert [(c.algorithm, c.codec, c.share_momentum) for c in several] == [
        ("fedavg", "int8", True), ("fedavg", "int8", False), ("gossip", "int8", True),
        ("gossip", "int8", False)]


@pytest.mark.slow
def test_compare_codec_study_across_algorithms_writes_csv_and_plot(tmp_path):
    rows = _compare("codec", tmp_path, "--churn_peers=8", "--max_iterations=1", "--codecs=int8",
                    "--algorithms=fedavg,gossip", "--target_accuracy=0.99")
    assert [(r["algorithm"], r["share_momentum"]) for r in rows] == [
        ("fedavg", "True"), ("fedavg", "False"), ("gossip", "True"), ("gossip", "False")]
    for momentum, weights in (rows[:2], rows[2:]):  # Weights only: half the encoded bytes.
        assert int(momentum["bytes_per_iteration"]) == 2 * int(weights["bytes_per_iteration"])
