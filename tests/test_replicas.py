"""--replicas=R: replica r of a run is the single run with --seed + r, row for row."""

from __future__ import annotations

import dataclasses
import json
import os

import chex
import jax
import numpy as np
import pytest

from marfl_jax import assemble, replicas, runner
from marfl_jax import data as data_lib
from marfl_jax import plan as plan_lib
from marfl_jax.config import Config, ConfigError
from tests.simulate import NUM_CLASSES, synthetic_data

# MAR-FL under churn, with attackers and a robust rule, drawn links and a Dirichlet partition:
# every input a replica draws from its seed (partition, pool, links, keys) differs.
DRAWN = Config(model="mlp", num_peers=16, group_size=4, key_dim=2, local_batches=1,
               batch_size=8, network="lognormal", compute_sigma=1.0, bandwidth_sigma=0.5,
               partition="dirichlet", dirichlet_alpha=0.5, update_fraction=0.75, dropout=0.25,
               byzantine_fraction=0.25, attack="sign_flip", aggregator="trimmed_mean",
               aggregator_f=1, eval_every=1, eval_peers="all", max_iterations=2,
               target_accuracy=1.0, checkpoint_every=0, plan="fixed", seed=5, replicas=2)


def _pieces(config):
    data = synthetic_data(config)
    sample = data_lib.preprocess(data.x_train[:1])
    model = assemble.build_model(config, NUM_CLASSES, plan_lib.fixed(config))
    return data, sample, model, assemble.pieces(config, model, sample)


def _single_steps(config, iterations):
    """The single run's states and infos on the synthetic data of `tests.simulate`."""
    data, sample, model, made = _pieces(config)
    state = assemble.initial_state(config, model, made.sim, sample)
    steps = assemble.Steps(made.sim, jax.eval_shape(lambda: state), data, config.seed)
    infos = []
    for t in range(iterations):
        state, info, _ = steps(state, t)
        infos.append(jax.device_get(info))
    return state, infos


@pytest.mark.slow  # Three compilations of the whole iteration: 27 s of the fast tier.
def test_each_replica_of_one_program_is_the_run_of_its_seed():
    """The stacked step of R = 2 replicas against the step of seed + 1 (replica 1, whose every
    draw differs from the flags' seed; the slow tier's runs check every replica): the state
    and every info entry after 2 iterations, to float tolerance (vmap may reorder a sum)."""
    config = DRAWN
    iterations = 2
    data, sample, model, made = _pieces(config)
    labels = np.asarray(data.y_train)
    stacked = assemble.replica_data(config, labels, data)
    inputs = assemble.replica_inputs(config, made.sim)
    assert inputs.byzantine.shape == (2, 16) and inputs.links.uplink_bps.shape == (2, 16)
    assert not np.array_equal(inputs.byzantine[0], inputs.byzantine[1])
    state = assemble.initial_state(config, model, made.sim, sample)
    steps = assemble.ReplicaSteps(made.sim, jax.eval_shape(lambda: state), stacked, inputs,
                                  assemble.replica_seeds(config))
    infos = []
    for t in range(iterations):
        state, info, _ = steps(state, t)
        infos.append(jax.device_get(info))
    for r in (1,):
        single = dataclasses.replace(config, seed=config.seed + r, replicas=1)
        single_state, single_infos = _single_steps(single, iterations)
        chex.assert_trees_all_close(jax.tree.map(lambda x, r=r: x[r], state), single_state,
                                    rtol=1e-5, atol=1e-6)
        for info, single_info in zip(infos, single_infos, strict=True):
            assert set(info) == set(single_info)
            chex.assert_trees_all_close({k: v[r] for k, v in info.items()}, single_info,
                                        rtol=1e-5, atol=1e-6)


def test_replica_data_pads_each_table_without_changing_its_draws():
    config = DRAWN
    data, *_ = _pieces(config)
    stacked = assemble.replica_data(config, np.asarray(data.y_train), data)
    for r in range(config.replicas):
        own = data_lib.partition(np.asarray(data.y_train), config.num_peers, config.partition,
                                 config.dirichlet_alpha, config.seed + r)
        np.testing.assert_array_equal(np.asarray(stacked.counts[r]), own.counts)
        width = own.table.shape[1]
        np.testing.assert_array_equal(np.asarray(stacked.table[r])[:, :width], own.table)
        key = jax.random.key(3)
        for peer in range(config.num_peers):
            np.testing.assert_array_equal(
                data_lib.sample_batches(key, stacked.table[r, peer], own.counts[peer], 2, 4),
                data_lib.sample_batches(key, own.table[peer], own.counts[peer], 2, 4))


def test_combined_rows_give_means_and_sample_stds_and_keep_equal_fields():
    rows = [{"iteration": 3, "accuracy": 0.5, "accuracy_std": 0.1, "cumulative_bytes": 10,
             "mean_group_size": 4.0, "seconds": 1.0},
            {"iteration": 3, "accuracy": 0.7, "accuracy_std": 0.3, "cumulative_bytes": 10,
             "mean_group_size": 4.0, "seconds": 2.0},
            {"iteration": 3, "accuracy": 0.9, "accuracy_std": 0.2, "cumulative_bytes": 13,
             "mean_group_size": 4.0, "seconds": 3.0}]
    combined = replicas.combine_rows(rows, 3)
    assert combined["iteration"] == 3 and combined["replicas"] == 3 and "seconds" not in combined
    np.testing.assert_allclose(combined["accuracy"], 0.7)
    np.testing.assert_allclose(combined["accuracy_std"], 0.2)  # Over replicas, ddof 1.
    np.testing.assert_allclose(combined["accuracy_peer_std"], 0.2)  # The peers' spread, mean.
    np.testing.assert_allclose(combined["cumulative_bytes"], 11.0)
    np.testing.assert_allclose(combined["cumulative_bytes_std"], np.std([10, 10, 13], ddof=1))
    assert combined["mean_group_size"] == 4.0 and combined["mean_group_size_std"] == 0.0


def test_the_interval_is_students_t_interval_of_the_mean():
    stats = replicas.interval([0.90, 0.91, 0.95])
    mean, std = np.mean([0.90, 0.91, 0.95]), np.std([0.90, 0.91, 0.95], ddof=1)
    np.testing.assert_allclose(stats["mean"], mean)
    np.testing.assert_allclose(stats["std"], std)
    np.testing.assert_allclose(stats["ci95"], [mean - 4.303 * std / np.sqrt(3),
                                               mean + 4.303 * std / np.sqrt(3)])
    assert replicas.interval([0.5, None])["std"] is None  # One value: no spread.
    assert replicas.interval([None])["mean"] is None
    # The expansion beyond the table: t_0.975 at 40 and 120 degrees of freedom.
    np.testing.assert_allclose(replicas.t_quantile_975(40), 2.021, atol=1e-3)
    np.testing.assert_allclose(replicas.t_quantile_975(120), 1.980, atol=1e-3)


def test_replicas_are_refused_with_asynchronous_runs():
    with pytest.raises(ConfigError, match="--replicas=2 is not allowed with --asynchronous"):
        Config(model="mlp", replicas=2, asynchronous=True, network="uniform").validate()
    with pytest.raises(ConfigError, match="--replicas"):
        Config(replicas=0).validate()


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _without_seconds(rows):
    """Rows without their wall times (a line of metrics_replicas.jsonl: its replicas' too)."""
    def strip(row):
        if row is None:
            return None
        return {k: [strip(r) for r in v] if k == "replicas" and isinstance(v, list) else v
                for k, v in row.items() if k != "seconds"}
    return [strip(row) for row in rows]


def _assert_replica_rows_are_the_single_runs(workdir, config, tmp_path):
    lines = _rows(os.path.join(workdir, replicas.ROWS_FILE))
    for r in range(config.replicas):
        single = runner.run(dataclasses.replace(config, seed=config.seed + r, replicas=1),
                            str(tmp_path / f"seed{r}")).metrics
        mine = [line["replicas"][r] for line in lines]
        assert len(mine) == len(single)
        for a, s in zip(_without_seconds(mine), _without_seconds(single), strict=True):
            assert set(a) == set(s)
            chex.assert_trees_all_close(a, s, rtol=2e-5, atol=1e-6,
                                        custom_message=f"replica {r}, iteration {s['iteration']}")


@pytest.mark.slow
def test_a_replicated_run_writes_each_seeds_rows_and_their_mean(tmp_path):
    config = DRAWN
    result = runner.run(config, str(tmp_path / "replicas"))
    _assert_replica_rows_are_the_single_runs(str(tmp_path / "replicas"), config, tmp_path)
    lines = _rows(tmp_path / "replicas" / replicas.ROWS_FILE)
    for row, line in zip(result.metrics, lines, strict=True):
        accuracies = [r["accuracy"] for r in line["replicas"]]
        np.testing.assert_allclose(row["accuracy"], np.mean(accuracies))
        np.testing.assert_allclose(row["accuracy_std"], np.std(accuracies, ddof=1))
    summary = json.loads((tmp_path / "replicas" / "summary.json").read_text())
    finals = [s["final_accuracy"] for s in summary["replica_summaries"]]
    np.testing.assert_allclose(summary["final_accuracy"], np.mean(finals))
    low, high = summary["final_accuracy_ci95"]
    assert low <= summary["final_accuracy"] <= high
    assert summary["replicas_reached_target"] == 0 and not summary["reached_target"]


VARIANTS = {
    "marfl_churn": dict(update_fraction=0.75, aggregate_fraction=0.75, dropout=0.25,
                        partition="iid_shuffled"),
    "fedavg": dict(algorithm="fedavg", partition="iid_shuffled"),
    "gossip": dict(algorithm="gossip", network="lognormal", compute_sigma=1.0),
    "robust_with_attackers": dict(byzantine_fraction=0.25, attack="alie",
                                  aggregator="centered_clip", clip_tau=1.0),
    "mkd": dict(mkd=True, mkd_iterations=2, mkd_batches=1),
    "dp": dict(dp=True, dp_noise_multiplier=0.5, update_fraction=0.75, aggregate_fraction=0.75),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_replica_r_is_the_single_run_with_seed_plus_r(variant, tmp_path):
    config = dataclasses.replace(
        Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=2,
               batch_size=8, eval_every=1, eval_peers="all", max_iterations=3,
               target_accuracy=1.0, checkpoint_every=0, plan="fixed", seed=11, replicas=3),
        **VARIANTS[variant])
    runner.run(config, str(tmp_path / "replicas"))
    _assert_replica_rows_are_the_single_runs(str(tmp_path / "replicas"), config, tmp_path)


@pytest.mark.slow
def test_a_replicated_run_killed_and_resumed_writes_the_uninterrupted_rows(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    config = dataclasses.replace(DRAWN, max_iterations=8, checkpoint_every=2, eval_every=3)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    straight = str(tmp_path / "straight")
    runner.run(config, straight)
    workdir = tmp_path / "killed"
    skip = {"workdir", "data_dir", "conv_impl"}
    command = [sys.executable, "-m", "launch.train", f"--workdir={workdir}"] + [
        f"--{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
        if f.name not in skip]
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    for name in ("metrics.jsonl", replicas.ROWS_FILE):
        assert (_without_seconds(_rows(workdir / name))
                == _without_seconds(_rows(os.path.join(straight, name)))), name


@pytest.mark.slow
def test_a_replica_that_diverges_stops_alone_and_is_reported(tmp_path, monkeypatch):
    """Replica 1's parameters made NaN after iteration 1: its row of iteration 2 is its last,
    the others run on, the means leave it out and the summary names it; every replica NaN: the
    run stops with the divergence error."""
    import jax.numpy as jnp

    from marfl_jax import watch

    config = dataclasses.replace(DRAWN, byzantine_fraction=0.0, attack="none",
                                 aggregator="mean", network="none", replicas=3,
                                 max_iterations=5, eval_every=2)
    original = assemble.ReplicaSteps.__call__
    poisoned = {1}

    def poisoning(self, state, t):
        if t == 2:
            state = state._replace(params=jax.tree.map(
                lambda x: x.at[jnp.asarray(sorted(poisoned))].set(jnp.nan), state.params))
        return original(self, state, t)

    monkeypatch.setattr(assemble.ReplicaSteps, "__call__", poisoning)
    result = runner.run(config, str(tmp_path / "one"))
    lines = _rows(tmp_path / "one" / replicas.ROWS_FILE)
    assert [line["replicas"][1] is None for line in lines] == [False] * 3 + [True] * 2
    assert [row["replicas"] for row in result.metrics] == [3, 3, 2, 2, 2]
    assert result.metrics[2]["diverged_replicas"] == 1
    np.testing.assert_allclose(result.metrics[4]["accuracy"], np.mean(
        [lines[4]["replicas"][r]["accuracy"] for r in (0, 2)]))
    (reported,) = result.summary["diverged_replicas"]
    assert reported["replica"] == 1 and reported["seed"] == config.seed + 1
    assert "not finite" in reported["diverged"] or "nan" in reported["diverged"]
    assert result.summary["replica_summaries"][1]["iterations"] == 3
    poisoned.update({0, 2})
    with pytest.raises(watch.DivergenceError, match="every replica diverged"):
        runner.run(config, str(tmp_path / "all"))
