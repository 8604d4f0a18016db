"""End-to-end runs at tiny scale through `runner.run`."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marfl_jax import assemble, evaluation, mixing, runner
from marfl_jax.config import Config

TINY = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=2, batch_size=16,
              eval_every=2, eval_peers="all", max_iterations=5, target_accuracy=1.0)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.smoke
def test_tiny_run_writes_outputs_and_exact_ledger(tmp_path):
    result = runner.run(TINY, str(tmp_path))
    rows = _rows(tmp_path)
    assert [r["iteration"] for r in rows] == list(range(5))
    assert rows == result.metrics
    # MLP 784-200-10 in float32; N * G * (M - 1) * 2S per iteration at full participation.
    payload = 4 * (784 * 200 + 200 + 200 * 10 + 10)
    per_iteration = 8 * 3 * (2 - 1) * 2 * payload
    assert all(r["bytes"] == per_iteration for r in rows)
    assert rows[-1]["cumulative_bytes"] == 5 * per_iteration
    assert all(r["present_peers"] == 8 and r["mean_group_size"] == 2.0 for r in rows)
    assert all(r["metadata_bytes"] == 8 * 3 * 64 for r in rows)  # DHT records, apart from bytes.
    # Evaluation at 0, 2, 4 (the last iteration); exact averaging: every peer holds one model.
    evaluated = [r for r in rows if "accuracy" in r]
    assert [r["iteration"] for r in evaluated] == [0, 2, 4]
    assert all(r["accuracy_min"] == r["accuracy_max"] and r["evaluated_peers"] == 8
               for r in evaluated)
    assert evaluated[-1]["accuracy"] > 0.5  # Learns: chance is 0.1.
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert summary["iterations"] == 5 and summary["cumulative_bytes"] == 5 * per_iteration
    assert summary["final_accuracy"] == evaluated[-1]["accuracy"]
    assert not summary["reached_target"]
    with open(tmp_path / "config.json") as f:
        assert Config.from_dict(json.load(f)) == dataclasses.replace(TINY, workdir=str(tmp_path))


@pytest.mark.slow
def test_same_seed_same_run_and_consensus_eval(tmp_path):
    a = runner.run(TINY, str(tmp_path / "a")).metrics
    b = runner.run(TINY, str(tmp_path / "b")).metrics
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b]
    # After exact averaging the consensus model is every peer's model.
    mean_eval = runner.run(dataclasses.replace(TINY, eval_peers="mean"), str(tmp_path / "c"))
    assert mean_eval.metrics[-1]["evaluated_peers"] == 1
    np.testing.assert_allclose(mean_eval.metrics[-1]["accuracy"], a[-1]["accuracy"], atol=1e-3)


@pytest.mark.slow
def test_stops_at_target(tmp_path):
    config = dataclasses.replace(TINY, target_accuracy=0.2, max_iterations=50)
    result = runner.run(config, str(tmp_path))
    assert result.summary["reached_target"]
    assert result.summary["iterations"] == result.summary["iteration_reached_target"] + 1
    assert result.metrics[-1]["accuracy"] >= 0.2


@pytest.mark.slow
def test_bucket_schedule_and_dirichlet_partition(tmp_path):
    config = dataclasses.replace(TINY, num_peers=6, group_size=4, key_dim=2,
                                 partition="dirichlet", dirichlet_alpha=0.3, max_iterations=3)
    rows = runner.run(config, str(tmp_path)).metrics
    # Each member receives |g| - 1 messages of weights + momentum per round (full participation,
    # so every iteration has the same groups).
    algorithm = assemble.algorithm(config)
    schedule = algorithm.schedule(jnp.ones((algorithm.num_rounds, 6), bool), jax.random.key(0))
    sizes = np.stack([mixing.member_group_sizes(ids, algorithm.num_groups) for ids in schedule])
    messages = int((sizes * (sizes > 0) - (sizes > 0)).sum())
    assert messages > 0
    for row in rows:
        assert row["messages"] == messages and row["payloads"] == 2 * messages
        assert row["bytes"] == 2 * messages * 4 * 159_010


def test_select_eval_peers_is_seeded():
    config = evaluation.Settings(eval_peers="3", seed=1)
    present = np.array([True, False, True, True, True, False, True])
    a = evaluation.select_eval_peers(config, present, 5)
    assert len(a) == 3 and set(a) <= set(np.flatnonzero(present))
    np.testing.assert_array_equal(a, evaluation.select_eval_peers(config, present, 5))
    assert evaluation.select_eval_peers(evaluation.Settings("mean", 0), present, 5) is None
    assert len(evaluation.select_eval_peers(evaluation.Settings("all", 0), present, 0)) == 5


@pytest.mark.slow
def test_cnn_learns_in_a_few_iterations(tmp_path):
    config = dataclasses.replace(TINY, model="cnn", num_peers=4, group_size=2, key_dim=2,
                                 local_batches=4, batch_size=16, max_iterations=10, eval_every=5)
    result = runner.run(config, str(tmp_path))
    assert result.summary["final_accuracy"] > 0.7



@pytest.mark.slow
@pytest.mark.parametrize("changes, rounds, exact", [
    (dict(num_peers=12, schedule="mixed_radix", key_dim=2), 2, True),  # 12 = 3 x 4.
    (dict(num_peers=9, group_size=3, key_dim=2, wire="butterfly"), 2, True),
    (dict(num_peers=8, group_size=2, key_dim=3, rounds=5), 5, True),
])
def test_schedules_wires_and_extra_rounds_end_to_end(changes, rounds, exact, tmp_path):
    config = dataclasses.replace(TINY, max_iterations=2, eval_every=1, **changes)
    rows = runner.run(config, str(tmp_path)).metrics
    sizes = [3, 4] if config.schedule == "mixed_radix" else [config.group_size] * rounds
    payload = 4 * (784 * 200 + 200 + 200 * 10 + 10)
    n = config.num_peers
    if config.wire == "butterfly":  # A group of g moves 2(g - 1) payloads of each tensor.
        expected = sum(n // g * 2 * (g - 1) for g in sizes) * 2 * payload
    else:
        expected = sum(n * (g - 1) for g in sizes) * 2 * payload
    for row in rows:
        assert row["bytes"] == expected
        assert row["metadata_bytes"] == n * rounds * 64
        assert (row["consensus_after"] == 0.0) == exact
        assert row["accuracy_std"] == 0.0  # Exact averaging: every peer holds one model.

