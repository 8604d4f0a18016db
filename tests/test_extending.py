"""The examples of docs/extending.md, executed as written (each block in a fresh namespace)."""

import os
import re

import numpy as np
import pytest

from marfl_jax import ALGORITHMS, DATASETS, MODELS, PARTITIONS, WIRE_MODELS, mixing
from marfl_jax.attacks import ATTACKS
from marfl_jax.rules import RULES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples() -> list[str]:
    with open(os.path.join(ROOT, "docs", "extending.md")) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for registry, name in ((MODELS, "tiny_mlp"), (DATASETS, "blobs"),
                           (PARTITIONS, "label_sorted"), (WIRE_MODELS, "one_message_each"),
                           (ALGORITHMS, "halves"), (RULES, "medoid"), (ATTACKS, "mimic")):
        registry.unregister(name)


def test_the_readme_has_six_examples_of_about_twenty_lines():
    examples = _examples()
    assert len(examples) == 6
    assert all(len(e.strip().splitlines()) <= 45 for e in examples)


@pytest.mark.slow
def test_own_model(in_tmp):
    namespace = {}
    exec(_examples()[0], namespace)
    result = namespace["result"]
    assert "tiny_mlp" in MODELS and result.summary["iterations"] == 2
    assert 0.0 <= result.summary["final_accuracy"] <= 1.0
    assert os.path.exists(in_tmp / "runs" / "tiny_mlp" / "metrics.jsonl")


@pytest.mark.slow
def test_own_data_and_partition(in_tmp):
    namespace = {}
    exec(_examples()[1], namespace)
    rows = namespace["result"].metrics
    # 600 examples cut into 6 label-sorted slices of 100: every peer trains.
    assert rows[0]["updating_peers"] == 6 and rows[0]["present_peers"] == 6
    index = PARTITIONS.get("label_sorted")(namespace["blobs"]().y_train, 6, alpha=1.0, seed=0)
    assert index.counts.tolist() == [100] * 6


@pytest.mark.slow
def test_own_schedule_and_wire_model(in_tmp):
    namespace = {}
    exec(_examples()[2], namespace)
    row = namespace["result"].metrics[0]
    payload = 4 * (784 * 200 + 200 + 200 * 10 + 10)
    assert row["bytes"] == 8 * 2 * 2 * payload and row["messages"] == 16
    assert row["consensus_after"] == 0.0 < row["consensus_before"]  # Exact for 4 | N.
    assert row["metadata_bytes"] == 0  # Only MAR-FL announces keys through a DHT.
    # The wire's own seconds: 2 rounds of one message (weights + momentum) at 10 Mbit/s.
    np.testing.assert_allclose(row["sim_comm_seconds"], 2 * 2 * payload / 1.25e6, rtol=1e-5)


def test_own_group_rule(in_tmp):
    namespace = {}
    exec(_examples()[3], namespace)
    np.testing.assert_allclose(np.asarray(namespace["mixed"]["w"])[:, 0],
                               [2.0, 2.0, 2.0, 2.0, 5.0, 7.0])
    assert "medoid" in RULES and namespace["config"].aggregator == "medoid"
    # Under churn the medoid of a pair is its lower-ranked member's copy.
    rule = RULES.get("medoid")
    x = np.arange(8, dtype=np.float32)[:, None]
    ids = np.array([[0, 0, 1, 1, -1, 2, 2, 3]], np.int32)
    np.testing.assert_allclose(mixing.mix(x, ids, mixing.mixer(4, rule, max_group_size=2))[:, 0],
                               [0, 0, 2, 2, 4, 5, 5, 7])


def test_own_attack(in_tmp):
    namespace = {}
    exec(_examples()[4], namespace)
    np.testing.assert_allclose(np.asarray(namespace["sent"]["w"])[..., 0],
                               [[2.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert "mimic" in ATTACKS and namespace["config"].attack == "mimic"


@pytest.mark.slow
def test_own_study(in_tmp):
    namespace = {}
    exec(_examples()[5], namespace)
    rows = namespace["outcome"].rows
    assert [(r["local_batches"], r["iterations"]) for r in rows] == [(1, 2), (2, 2)]
    with open(in_tmp / "runs" / "b" / "local_batches.csv") as f:
        assert f.readline().startswith("local_batches,num_peers,algorithm")
    assert os.path.getsize(in_tmp / "runs" / "b" / "local_batches.png") > 0
    # A second pass reads the finished runs back.
    again = namespace["sweep"].run_configs(namespace["STUDY"].configs(
        namespace["tiny"], "runs/b"), make_row=namespace["make_row"])
    assert again == rows


def test_the_front_pages_model_example_registers_a_valid_model():
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    (example,) = [block for block in blocks if "MODELS.register" in block]
    try:
        exec(example, {})
        from marfl_jax import Config

        assert Config(model="logistic").validate().model == "logistic"
    finally:
        MODELS.unregister("logistic")
