"""Tests of the baseline schedules and of every algorithm's full-participation exactness and
wire cost against its closed form."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from marfl_jax import assemble, comm, mixing
from marfl_jax.algorithms import baselines
from marfl_jax.config import Config

S = 4 * 159_010  # MLP 784-200-10 in float32.


def _tree(num_peers, seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(num_peers, 4)), jnp.float32)}


def _run(config, present=None, seed=0):
    algorithm = assemble.algorithm(config)
    n = config.num_peers
    present = jnp.ones(n, bool) if present is None else present
    present = jnp.broadcast_to(present, (algorithm.num_rounds, n))
    schedule = algorithm.schedule(present, jax.random.key(seed))
    sizes = np.asarray(comm.member_sizes(schedule, algorithm.num_groups))
    cost = comm.get_wire(algorithm.wire).cost(sizes, S, 2)  # Weights + momentum.
    return algorithm, schedule, cost


class ClosedFormTest(chex.TestCase, parameterized.TestCase):

    @parameterized.parameters(16, 27, 64)
    def test_exact_global_mean_and_cost(self, n):
        base = Config(num_peers=n)
        closed_forms = {  # Bytes per iteration at full participation, 2 payloads per message.
            "fedavg": 2 * n * 2 * S,
            "arfl": n * (n - 1) * 2 * S,
            "rdfl": n * (n - 1) * 2 * S,
        }
        tree = _tree(n)
        mean = jax.tree.map(lambda x: jnp.broadcast_to(x.mean(0), x.shape), tree)
        for name, expected in closed_forms.items():
            algorithm, schedule, cost = _run(dataclasses.replace(base, algorithm=name))
            self.assertTrue(algorithm.exact)
            mixer = mixing.mixer(algorithm.num_groups)
            chex.assert_trees_all_close(mixing.mix(tree, schedule, mixer), mean,
                                        atol=1e-5)
            self.assertEqual(cost.bytes, expected, name)

    def test_marfl_vs_arfl_ratio_at_paper_setting(self):
        config = Config(num_peers=125, group_size=5, key_dim=3)
        _, _, marfl_cost = _run(config)
        _, _, arfl_cost = _run(dataclasses.replace(config, algorithm="arfl"))
        self.assertEqual(marfl_cost.bytes, 125 * 3 * 4 * 2 * S)
        self.assertAlmostEqual(arfl_cost.bytes / marfl_cost.bytes, 124 / 12)

    def test_gossip_pairs_cost_one_payload_per_member_per_round(self):
        _, schedule, cost = _run(Config(num_peers=10, algorithm="gossip", rounds=3))
        self.assertEqual(schedule.shape, (3, 10))
        for round_ids in np.asarray(schedule):
            self.assertTrue(np.all(np.bincount(round_ids) == 2))
        self.assertEqual(cost.messages, 3 * 10)


class RingArcsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_arcs_break_at_absent_peers_and_wrap(self):
        present = jnp.array([1, 1, 0, 1, 1, 1, 0, 0, 1], bool)
        arcs = self.variant(baselines.ring_arcs)(present)
        # Runs: {3,4,5} starts first, {8,0,1} wraps around.
        chex.assert_trees_all_equal(arcs, jnp.array([1, 1, -1, 0, 0, 0, -1, -1, 1], jnp.int32))

    def test_everyone_present_is_one_ring_and_nobody_present_is_empty(self):
        chex.assert_trees_all_equal(baselines.ring_arcs(jnp.ones(5, bool)),
                                    jnp.zeros(5, jnp.int32))
        chex.assert_trees_all_equal(baselines.ring_arcs(jnp.zeros(4, bool)),
                                    jnp.full(4, -1, jnp.int32))

    def test_rdfl_cost_under_churn_is_sum_over_arcs(self):
        present = jnp.array([1, 1, 0, 1, 1, 1, 0, 0, 1], bool)
        _, _, cost = _run(Config(num_peers=9, algorithm="rdfl"), present)
        self.assertEqual(cost.messages, 3 * 2 + 3 * 2)


class GossipTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_only_present_peers_pair(self):
        present = jnp.array([1, 0, 1, 1, 0, 1, 1], bool)
        ids = np.asarray(self.variant(baselines.random_pairs)(
            jnp.broadcast_to(present, (4, 7)), jax.random.key(1)))
        self.assertTrue(np.all(ids[:, ~np.asarray(present)] == -1))
        for round_ids in ids:
            counts = np.bincount(round_ids[round_ids >= 0])
            self.assertEqual(sorted(counts[counts > 0]), [1, 2, 2])  # 5 present: 2 pairs + 1.
