"""Tests of the studies' configs and rows, their discovery, and of `launch.compare` end to end
on a tiny sweep."""

import csv
import importlib
import os
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

from marfl_jax import experiments, runner, scales, sweep
from marfl_jax.config import Config
from marfl_jax.experiments import codec, mkd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_module_of_the_package_is_a_study():
    modules = sorted(info.name for info in pkgutil.iter_modules(experiments.__path__))
    assert modules == list(experiments.studies())  # A module without STUDY fails here.
    for name in modules:
        study = importlib.import_module(f"marfl_jax.experiments.{name}").STUDY
        assert experiments.get(name) is study and study.name == name
    assert experiments.paper_names() == ("baselines", "churn", "mkd", "dp", "text", "network",
                                         "codec", "byzantine", "asynchrony")
    for study in experiments.studies().values():
        assert study.section is None or (study.title and study.claim and study.setting
                                         and study.summarize)


def test_every_study_runs_with_the_replicas_given():
    """launch.compare / launch.reproduce --replicas=3: every run of every study has 3 replicas,
    but asynchronous runs (one timeline each: refused), which keep 1."""
    for name, study in experiments.studies().items():
        scale = experiments.compare_scale(study, mnist={"replicas": 3})
        configs = study.configs(scale, f"runs/{name}")
        assert configs, name
        for config in configs:
            assert config.replicas == (1 if config.asynchronous else 3), (name, config.workdir)


def test_a_replicated_runs_row_csv_and_table_cell_carry_the_spread(tmp_path):
    from marfl_jax import report

    config = Config(replicas=3)
    summary = {"final_accuracy": 0.9, "final_accuracy_std": 0.01, "iteration_reached_target": 9,
               "iteration_reached_target_std": 1.5, "bytes_to_target_std": None,
               "replicas_reached_target": 2}
    row = sweep.with_spread({"final_accuracy": 0.9, "iterations_to_target": 10,
                             "bytes_to_target": 5e9}, config, summary)
    assert row == {"final_accuracy": 0.9, "iterations_to_target": 10, "bytes_to_target": 5e9,
                   "replicas": 3, "replicas_reached_target": 2, "final_accuracy_std": 0.01,
                   "iterations_to_target_std": 1.5, "bytes_to_target_std": ""}
    single = {"final_accuracy": 0.9}
    assert sweep.with_spread(single, Config(), summary) is single
    path = tmp_path / "rows.csv"
    sweep.write_csv([row], str(path), ("final_accuracy", "iterations_to_target",
                                       "bytes_to_target", "wall_seconds"))
    with open(path) as f:
        assert next(csv.reader(f)) == ["final_accuracy", "final_accuracy_std",
                                       "iterations_to_target", "iterations_to_target_std",
                                       "bytes_to_target", "bytes_to_target_std", "wall_seconds",
                                       "replicas", "replicas_reached_target"]
    assert report.cell(row, "final_accuracy") == "90.00 ± 1.00 %"
    assert report.cell(row, "iterations_to_target") == "10 ± 1.5"
    assert report.cell(row, "bytes_to_target") == "5.00 GB"  # No spread: the value.


def test_compare_defaults_come_from_the_study():
    scale = experiments.compare_scale(experiments.get("mkd"))
    (plain, *_) = experiments.get("mkd").configs(scale, "runs/mkd")
    assert (plain.model, plain.local_batches, plain.eval_every, plain.num_peers) == (
        "cnn", 4, 1, 64)
    assert scales.SCALES["small"].mnist.model == "mlp"


def test_a_study_declares_its_settings_and_a_scale_gives_some():
    churn = experiments.get("churn")
    assert churn.options_of(scales.SCALES["full"]).dropouts == (0.0, 0.1, 0.2, 0.5)  # Default.
    assert churn.options_of(scales.SCALES["small"]).dropouts == (0.0, 0.2, 0.5)  # The scale's.
    # launch.compare: the study's defaults, not the settings a scale gives the reproduction.
    assert churn.options_of(experiments.compare_scale(churn)).dropouts == (0.0, 0.1, 0.2, 0.5)
    scale = experiments.compare_scale(churn, sizes={"study_peers": 16}, mnist={"seed": 3},
                                      options=[("dropouts", ("0.5",)),
                                               ("algorithms", ("marfl",))])
    configs = churn.configs(scale, "runs/c")
    assert [(c.algorithm, c.dropout, c.num_peers, c.seed) for c in configs] == [
        ("marfl", 0.5, 16, 3)]
    # A setting of one value, and one that defaults to the shared setting's.
    dp = experiments.get("dp")
    given = experiments.compare_scale(dp, mnist={"max_iterations": 7},
                                      options=[("noise_multipliers", ("1",))])
    assert [(c.max_iterations, c.dp, c.dp_noise_multiplier)
            for c in dp.configs(given, "runs/d")][1] == (7, True, 1.0)
    assert [c.max_iterations for c in dp.configs(given, "runs/d")] == [7, 7]
    assert {c.max_iterations for c in dp.configs(scales.SCALES["small"], "runs/d")} == {40}
    assert experiments.compare_scale(mkd.STUDY, options=[("iterations", ("3",))]).options == {
        "mkd": {"iterations": 3}}
    for scale in scales.SCALES.values():
        experiments.check_options(scale)


def test_an_unknown_setting_is_refused_naming_the_study_and_its_settings():
    byzantine = experiments.get("byzantine")
    with pytest.raises(ValueError, match=r"^--option: the study byzantine has no option "
                       r"rulez; its options: fractions, attacks, rules, placements, "
                       r"algorithms, group_sizes, noniid_alphas, iterations$"):
        experiments.compare_scale(byzantine, options=[("rulez", ("krum",))])
    with pytest.raises(ValueError, match="the study scaling has no option dropouts; its "
                       "options: none"):
        experiments.compare_scale(experiments.get("scaling"), options=[("dropouts", ("0",))])
    with pytest.raises(ValueError, match=r"--option=iterations=1,2: takes one value, not 2"):
        experiments.compare_scale(mkd.STUDY, options=[("iterations", ("1", "2"))])
    with pytest.raises(ValueError, match=r"--option=fractions=x: could not convert"):
        experiments.compare_scale(mkd.STUDY, options=[("fractions", ("x",))])
    bad = scales.with_options(scales.SCALES["small"], "churn", {"dropout": (0.1,)})
    with pytest.raises(ValueError, match="scale small: the study churn has no option dropout"):
        experiments.paper(bad, "w", ["baselines"])
    with pytest.raises(ValueError, match="scale small: options for unknown studies chrun"):
        experiments.check_options(scales.with_options(scales.SCALES["small"], "chrun", {}))


@pytest.mark.smoke
def test_compare_refuses_an_unknown_setting_before_any_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launch.compare", "--study=byzantine", "--option=rulez=krum",
         f"--workdir={tmp_path / 'runs'}"], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("error: --option: the study byzantine has no option rulez; its options: "
            "fractions, attacks, rules, placements, algorithms, group_sizes, noniid_alphas, "
            "iterations") in result.stderr
    assert not (tmp_path / "runs").exists()


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


def test_asynchrony_configs_pair_every_mode_with_every_profile():
    from marfl_jax.experiments import asynchrony

    scale = scales.with_options(scales.SCALES["small"], "asynchrony", {
        "setups": ("mlp@64", "cnn@16"), "profiles": ("sigma1", "slow10")})
    configs = asynchrony.configs(scale, "runs/async_test")
    assert len(configs) == 2 * 2 * 4
    names = [os.path.basename(c.workdir) for c in configs]
    assert names[:4] == ["mlp_n64__sigma1__sync_marfl", "mlp_n64__sigma1__async_marfl",
                         "mlp_n64__sigma1__sync_gossip", "mlp_n64__sigma1__async_gossip"]
    assert [(c.model, c.num_peers, c.group_size, c.key_dim) for c in configs[::8]] == [
        ("mlp", 64, 4, 3), ("cnn", 16, 4, 2)]
    assert all(c.eval_every == 1 and c.matchmaking_window_s == 2.0 for c in configs)
    assert [c.asynchronous for c in configs[:4]] == [False, True, False, True]
    trace = configs[4].network_trace
    with open(trace) as f:
        speeds = [float(line.split(",")[3]) for line in list(f)[1:]]
    assert sorted(set(speeds)) == [10.0, 100.0] and speeds.count(10.0) == 7  # ceil(10 % of 64)
    with pytest.raises(ValueError, match="--option=modes: unknown sync"):
        asynchrony.configs(scales.with_options(scale, "asynchrony", {"modes": ("sync",)}), "x")


@pytest.mark.slow
def test_compare_asynchrony_study_writes_csv_and_plot(tmp_path):
    rows = _compare("asynchrony", tmp_path, "--option=setups=mlp@16",
                    "--option=profiles=sigma1", "--option=row_every_s=5",
                    "--max_iterations=3", "--target_accuracy=0.5")
    assert [r["mode"] for r in rows] == ["sync_marfl", "async_marfl", "sync_gossip",
                                         "async_gossip"]
    assert rows[0]["staleness_mean"] == "" and rows[1]["staleness_mean"] != ""
    assert all(float(r["final_accuracy"]) > 0.1 for r in rows)


def test_accuracy_curves_of_replicated_runs_draw_a_band():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from marfl_jax import plotting

    fig, ax = plt.subplots()
    rows = [{"accuracy": 0.5, "accuracy_std": 0.1, "replicas": 3},
            {"accuracy": 0.8, "accuracy_std": 0.05, "replicas": 3}]
    plotting.accuracy_curve(ax, [0, 1], rows)
    plotting.accuracy_curve(ax, [0, 1], [{"accuracy": 0.5, "accuracy_std": 0.1}] * 2)  # Peers'.
    (band,) = ax.collections  # Only the replicated run's.
    np.testing.assert_allclose(band.get_paths()[0].vertices[:, 1].min(), 0.4)
    np.testing.assert_allclose(band.get_paths()[0].vertices[:, 1].max(), 0.85)
    plt.close(fig)
