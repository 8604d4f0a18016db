"""Tests of participation, dropout and availability, and of runs under churn."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marfl_jax import churn, runner
from marfl_jax.config import Config
from tests.simulate import simulate


def _draw(model, num_peers=200, num_rounds=3, seed=0, available=None):
    available = jnp.ones(num_peers, bool) if available is None else available
    return churn.draw_participation(jax.random.key(seed), available, num_rounds, model)


class TestParticipation:

    def test_fractions_draw_exact_counts_and_nested_sets(self):
        part = _draw(churn.ChurnModel(update_fraction=0.5, aggregate_fraction=0.25))
        updating, aggregating = np.asarray(part.updating), np.asarray(part.present[0])
        assert updating.sum() == 100 and aggregating.sum() == 50
        assert np.all(updating[aggregating])  # Prefixes of one permutation: nested.
        same = _draw(churn.ChurnModel(update_fraction=0.3, aggregate_fraction=0.3))
        np.testing.assert_array_equal(same.updating, same.present[0])

    def test_no_dropout_means_every_aggregator_in_every_round(self):
        part = _draw(churn.ChurnModel())
        assert bool(jnp.all(part.present)) and bool(jnp.all(part.updating))

    @pytest.mark.parametrize("dropout", [0.0, 0.5, 0.95, 1.0])
    def test_dropout_rate(self, dropout):
        part = _draw(churn.ChurnModel(dropout=dropout), num_peers=4000)
        rate = 1 - float(part.present[0].mean())
        assert abs(rate - dropout) < 0.03
        assert bool(jnp.all(part.present == part.present[0]))  # The whole aggregation.

    def test_mid_aggregation_dropout_leaves_for_good(self):
        part = _draw(churn.ChurnModel(dropout=0.5, dropout_timing="mid"), num_peers=2000,
                     num_rounds=4)
        present = np.asarray(part.present)
        assert np.all(present[1:] <= present[:-1])  # Once gone, gone for the iteration.
        left_during = present[0] & ~present[-1]
        assert left_during.sum() > 200  # Some took part in early rounds only.
        assert abs((1 - present[-1].mean()) - 0.5) < 0.04

    def test_unavailable_peers_neither_train_nor_aggregate(self):
        available = jnp.arange(10) % 2 == 0
        part = _draw(churn.ChurnModel(), num_peers=10, available=available)
        assert not bool(jnp.any(part.updating & ~available))
        assert not bool(jnp.any(part.present & ~available))


class TestMarkovAvailability:

    def test_stationary_fraction_and_mean_on_time(self):
        model = churn.ChurnModel(availability="markov", mean_on=5.0, mean_off=2.0)
        available = churn.initial_availability(jax.random.key(0), 3000, model)
        step = jax.jit(lambda k, a: churn.next_availability(k, a, model))
        history = [np.asarray(available)]
        for t in range(200):
            available = step(jax.random.key(t + 1), available)
            history.append(np.asarray(available))
        history = np.stack(history)
        assert abs(history.mean() - 5 / 7) < 0.02
        # Mean length of on-runs that start after t=0 and end before the last step.
        starts = history[1:] & ~history[:-1]
        ends = history[:-1] & ~history[1:]
        assert abs(ends.sum() / max(starts.sum(), 1) - 1) < 0.05  # Balanced flow.
        assert abs(history[:-1].sum() / ends.sum() - 5.0) < 0.3

    def test_always_is_identity(self):
        available = jnp.array([True, False])
        chex.assert_trees_all_equal(churn.next_availability(
            jax.random.key(0), available, churn.ChurnModel()), available)


TINY = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=2, batch_size=8,
              eval_every=2, eval_peers="all", max_iterations=3, target_accuracy=1.0,
              checkpoint_every=0)


def _slow(changes):  # Every case compiles its own iteration: the fast tier keeps three.
    return pytest.param(changes, marks=pytest.mark.slow)


@pytest.mark.parametrize("changes", [
    dict(dropout=0.5), _slow(dict(dropout=0.95)), _slow(dict(dropout=0.5, dropout_timing="mid")),
    _slow(dict(update_fraction=0.5, aggregate_fraction=0.75)),
    dict(availability="markov", mean_on_iterations=2.0, mean_off_iterations=2.0),
    _slow(dict(num_peers=1)),
    _slow(dict(num_peers=5, group_size=4, key_dim=2)),  # Buckets; one of size 1.
    _slow(dict(algorithm="rdfl", dropout=0.5)), _slow(dict(algorithm="gossip", dropout=0.5)),
    dict(algorithm="fedavg", dropout=0.5, eval_peers="mean"),
])
def test_runs_under_churn(changes):
    config = dataclasses.replace(TINY, **changes)
    rows, state = simulate(config)
    assert len(rows) == 3
    payload = 4 * 159_010  # The MLP's float32 weights; every message carries them + momentum.
    for row in rows:
        assert 0 <= row["present_peers"] <= config.num_peers
        assert 0 <= row["updating_peers"] <= config.num_peers
        assert row["consensus_after"] <= row["consensus_before"] + 1e-6
        assert row["bytes"] == row["payloads"] * payload and row["payloads"] == 2 * row["messages"]
        # Messages flow in groups of two or more; a lone FedAvg client still meets the server.
        exchanging = row["mean_group_size"] > 1 or (
            config.algorithm == "fedavg" and row["present_peers"] > 0)
        assert (row["bytes"] > 0) == exchanging
        assert np.isfinite(row["train_loss"])
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_everyone_absent_is_skipped_not_crashed(tmp_path):
    config = dataclasses.replace(TINY, dropout=1.0, update_fraction=0.125,
                                 aggregate_fraction=0.125, availability="markov",
                                 mean_on_iterations=1.0, mean_off_iterations=50.0)
    rows = runner.run(config, str(tmp_path)).metrics
    assert all(r["bytes"] == 0 for r in rows)
    assert any(r["present_peers"] == 0 and r["updating_peers"] == 0 for r in rows)
    assert rows[-1]["evaluated_peers"] == 8  # Nobody present: every peer is evaluated.


@pytest.mark.slow
def test_full_dropout_exchanges_nothing_and_peers_drift(tmp_path):
    config = dataclasses.replace(TINY, dropout=1.0, partition="dirichlet", dirichlet_alpha=0.1)
    rows = runner.run(config, str(tmp_path)).metrics
    assert all(r["bytes"] == 0 and r["present_peers"] == 0 for r in rows)
    assert rows[-1]["updating_peers"] > 0
