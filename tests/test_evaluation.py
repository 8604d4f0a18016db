"""Evaluation: each distinct model once, the same accuracies as evaluating every peer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marfl_jax import Config, evaluation, local, models


def _setup(num_peers=8):
    model = models.get_model("mlp", 10, hidden=(16,))
    apply_fn = models.make_apply_fn(model)
    one = model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
    params = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_peers,) + x.shape), one)
    # Peers 2 and 5 hold other models; 0, 1, 3, 4, 6, 7 share one.
    params = jax.tree.map(lambda x: x.at[2].add(0.3).at[5].add(-0.2), params)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(300, 784)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 300), jnp.int32)
    evaluate_peers = jax.jit(functools.partial(local.evaluate_peers, apply_fn=apply_fn))
    return params, images, labels, evaluate_peers


def test_distinct_models_groups_bitwise_equal_peers():
    params, *_ = _setup()
    peers = np.array([0, 2, 3, 5, 7])
    representatives, inverse = evaluation.distinct_models(params, peers)
    assert representatives.tolist() == [0, 2, 5]
    np.testing.assert_array_equal(representatives[inverse], [0, 2, 0, 5, 0])
    # One ulp apart is another model.
    nudged = jax.tree.map(lambda x: x.at[3].set(jnp.nextafter(x[3], jnp.inf)), params)
    assert evaluation.distinct_models(nudged, peers)[0].tolist() == [0, 2, 3, 5]


def test_a_fingerprint_collision_never_merges_two_models(monkeypatch):
    params, *_ = _setup()
    monkeypatch.setattr(evaluation, "fingerprints",
                        lambda params, peers: jnp.zeros((peers.shape[0], 2), jnp.uint32))
    representatives, inverse = evaluation.distinct_models(params, np.array([0, 2, 3]))
    assert representatives.tolist() == [0, 2, 3] and inverse.tolist() == [0, 1, 2]


@pytest.mark.parametrize("eval_peers", ["all", "3", "8"])
def test_same_accuracies_as_evaluating_every_peer(eval_peers):
    params, images, labels, evaluate_peers = _setup()
    config = Config(eval_peers=eval_peers, num_peers=8).settings(evaluation.Settings)
    present = np.ones(8, bool)
    row = evaluation.evaluate(config, params, present, 5, evaluate_peers, images, labels)
    peers = evaluation.select_eval_peers(config, present, 5)
    accuracy, loss = evaluate_peers(jax.tree.map(lambda x: x[peers], params), images, labels)
    accuracy, loss = np.asarray(accuracy), np.asarray(loss)
    assert row["accuracy"] == float(accuracy.mean()) and row["loss"] == float(loss.mean())
    assert row["accuracy_min"] == float(accuracy.min())
    assert row["accuracy_max"] == float(accuracy.max())
    assert row["evaluated_peers"] == len(peers)


def test_bfloat16_compute_runs_matmuls_in_bfloat16_with_float32_parameters():
    model = models.get_model("mlp", 10, hidden=(16,))
    apply_fn = models.make_apply_fn(model, "bfloat16")
    params = model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
    x = jnp.ones((4, 784))

    def loss(p):
        return apply_fn(p, x).sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert "dot_general" in jaxpr and "bf16" in jaxpr
    grads = jax.grad(loss)(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert apply_fn(params, x).dtype == jnp.float32
    np.testing.assert_allclose(apply_fn(params, x), models.make_apply_fn(model)(params, x),
                               rtol=0.05, atol=0.05)
