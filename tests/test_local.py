"""Tests of local training and evaluation with a tiny linear model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from marfl_jax import local


def apply_fn(params, x, rng=None):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _params(seed=0, num_peers=None):
    rng = np.random.default_rng(seed)
    shape = (num_peers,) if num_peers else ()
    return {"w": jnp.asarray(rng.normal(size=shape + (6, 3)) * 0.1, jnp.float32),
            "b": jnp.zeros(shape + (3,), jnp.float32)}


def _batches(seed, shape):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape + (6,)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=shape), jnp.int32)
    return x, y


class MomentumSgdTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_the_authors_update_rule(self):
        eta, beta = 0.1, 0.9
        optimizer = local.momentum_sgd(eta, beta)
        params = _params()
        x, y = _batches(1, (3, 4))  # b=3 batches of B=4.
        run = self.variant(lambda p, s, x, y: local.local_sgd(
            p, s, x, y, apply_fn=apply_fn, optimizer=optimizer))
        new_params, _, _ = run(params, optimizer.init(params), x, y)

        p = jax.tree.map(np.asarray, params)
        m = jax.tree.map(np.zeros_like, p)
        for i in range(3):
            g = jax.grad(lambda q, i=i: local.cross_entropy(apply_fn(q, x[i]), y[i]))(p)
            m = jax.tree.map(lambda m_, g_: beta * m_ + (1 - beta) * np.asarray(g_), m, g)
            p = jax.tree.map(lambda p_, m_: p_ - eta * m_, p, m)
        chex.assert_trees_all_close(new_params, p, atol=1e-6)

    def test_vmapped_equals_per_peer_and_inactive_peers_keep_state(self):
        optimizer = local.momentum_sgd(0.1, 0.9)
        num_peers = 4
        params = _params(num_peers=num_peers)
        opt_state = jax.vmap(optimizer.init)(params)
        x, y = _batches(2, (num_peers, 2, 5))
        active = jnp.array([True, False, True, True])
        new_params, new_state, losses = jax.jit(lambda *a: local.peers_local_sgd(
            *a, apply_fn=apply_fn, optimizer=optimizer))(params, opt_state, x, y, active)
        for p in range(num_peers):
            one = jax.tree.map(lambda t, p=p: t[p], params)
            expected, _, loss = local.local_sgd(one, optimizer.init(one), x[p], y[p],
                                                apply_fn=apply_fn, optimizer=optimizer)
            if not active[p]:
                expected, loss = one, 0.0
            chex.assert_trees_all_close(jax.tree.map(lambda t, p=p: t[p], new_params), expected,
                                        atol=1e-6)
            np.testing.assert_allclose(losses[p], loss, rtol=1e-5)
        chex.assert_trees_all_equal(jax.tree.map(lambda t: t[1], new_state),
                                    jax.tree.map(lambda t: t[1], opt_state))


class EvaluateTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_direct_computation_with_ragged_batches(self):
        params = _params(3)
        x, y = _batches(4, (37,))
        accuracy, loss = self.variant(lambda p, x, y: local.evaluate(
            p, x, y, apply_fn=apply_fn, batch_size=8))(params, x, y)
        logits = apply_fn(params, x)
        np.testing.assert_allclose(accuracy, np.mean(np.asarray(logits.argmax(-1) == y)),
                                   rtol=1e-6)
        np.testing.assert_allclose(
            loss, optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), rtol=1e-5)

    def test_evaluate_peers(self):
        params = _params(5, num_peers=3)
        x, y = _batches(6, (20,))
        accuracy, _ = local.evaluate_peers(params, x, y, apply_fn=apply_fn, batch_size=7)
        for p in range(3):
            one = jax.tree.map(lambda t, p=p: t[p], params)
            np.testing.assert_allclose(accuracy[p], local.evaluate(
                one, x, y, apply_fn=apply_fn)[0], rtol=1e-6)
