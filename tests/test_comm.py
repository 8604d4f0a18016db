"""Tests of the communication ledger: group sizes from jit, exact bytes on the host."""

import json

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from marfl_jax import comm
from marfl_jax.algorithms import marfl

CNN_BYTES = 4 * 1_199_882  # The paper's CNN in float32.


def _full_grid_sizes(group_size, key_dim):
    num_peers = group_size**key_dim
    rule = marfl.authors_key_rule(num_peers, group_size, key_dim)
    schedule = marfl.moshpit_schedule(jnp.ones((key_dim, num_peers), bool), rule)
    return np.asarray(comm.member_sizes(schedule, rule.num_groups))


class WireModelTest(chex.TestCase, parameterized.TestCase):

    @parameterized.parameters((4, 2), (4, 3), (5, 3), (2, 6))
    def test_allgather_full_participation_equals_formula(self, group_size, key_dim):
        num_peers = group_size**key_dim
        ledger = comm.Ledger(payload_bytes=CNN_BYTES, payloads_per_message=2)
        row = ledger.record(_full_grid_sizes(group_size, key_dim))
        # N * G * (M - 1) * 2S at full participation (docs/design.md §3.6).
        expected = num_peers * key_dim * (group_size - 1) * 2 * CNN_BYTES
        self.assertEqual(row["bytes"], expected)
        self.assertEqual(row["payloads"], num_peers * key_dim * (group_size - 1) * 2)
        self.assertEqual(row["messages"], num_peers * key_dim * (group_size - 1))
        self.assertEqual(row["max_peer_bytes"], key_dim * (group_size - 1) * 2 * CNN_BYTES)
        self.assertEqual(ledger.record(_full_grid_sizes(group_size, key_dim))["cumulative_bytes"],
                         2 * expected)

    @parameterized.parameters((4, 3), (5, 3), (8, 2))
    def test_butterfly_full_participation_equals_formula(self, group_size, key_dim):
        num_peers = group_size**key_dim
        cost = comm.butterfly_cost(_full_grid_sizes(group_size, key_dim), CNN_BYTES, 2)
        # Per member per round 2(M-1)/M payloads: N * G * 2(M-1)/M * 2S in total.
        self.assertEqual(cost.bytes * group_size,
                         num_peers * key_dim * 2 * (group_size - 1) * 2 * CNN_BYTES)
        self.assertEqual(cost.messages, num_peers * key_dim * 2 * (group_size - 1))
        chunk = -(-CNN_BYTES // group_size)
        self.assertEqual(cost.max_peer_bytes, key_dim * 2 * (group_size - 1) * chunk * 2)

    def test_metadata_is_one_record_per_present_peer_per_round(self):
        ledger = comm.Ledger(payload_bytes=CNN_BYTES, payloads_per_message=2,
                             metadata_record_bytes=comm.DHT_RECORD_BYTES)
        row = ledger.record(np.array([[2, 2, 0, 1], [3, 3, 3, 0]]))
        self.assertEqual(row["metadata_bytes"], 6 * comm.DHT_RECORD_BYTES)
        self.assertEqual(row["bytes"], (1 + 1 + 0 + 0 + 2 + 2 + 2) * 2 * CNN_BYTES)  # Apart.
        self.assertEqual(ledger.record(np.array([[2, 2]]))["cumulative_metadata_bytes"],
                         8 * comm.DHT_RECORD_BYTES)

    def test_star(self):
        sizes = np.array([[5, 5, 0, 5, 5, 5]])
        cost = comm.star_cost(sizes, 10, 2)
        self.assertEqual(cost, comm.WireCost(messages=10, payloads=20, bytes=200,
                                             max_peer_bytes=100))

    @chex.variants(with_jit=True, without_jit=True)
    def test_member_sizes_with_absent_and_lonely_peers(self):
        schedule = jnp.array([[0, 0, 1, -1, 2, 2, 2]], jnp.int32)
        sizes = self.variant(lambda s: comm.member_sizes(s, 3))(schedule)
        chex.assert_trees_all_equal(sizes, jnp.array([[2, 2, 1, 0, 3, 3, 3]], jnp.int32))
        cost = comm.allgather_cost(np.asarray(sizes), 1, 1)
        self.assertEqual(cost.messages, 1 + 1 + 0 + 0 + 2 * 3)
        self.assertEqual(comm.mean_group_size(np.asarray(sizes)), 2.0)  # Groups of 2, 1 and 3.

    def test_bytes_are_exact_python_ints_beyond_int32(self):
        ledger = comm.Ledger(payload_bytes=CNN_BYTES, payloads_per_message=2)
        row = ledger.record(np.full((3, 10_000), 10, np.int32))
        self.assertIsInstance(row["bytes"], int)
        self.assertEqual(row["bytes"], 10_000 * 27 * 2 * CNN_BYTES)
        self.assertGreater(row["bytes"], 2**40)

    def test_tree_bytes(self):
        tree = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float16)}
        self.assertEqual(comm.tree_bytes(tree), 3 * 4 * 4 + 5 * 2)


def test_the_ledger_saves_and_restores_its_own_totals():
    sizes = np.array([[2, 2, 2, 2], [4, 4, 4, 4]])
    ledger = comm.Ledger(payload_bytes=100, payloads_per_message=2, metadata_record_bytes=64)
    ledger.record(sizes)
    state = json.loads(json.dumps(ledger.state()))  # As a checkpoint stores it.
    resumed = comm.Ledger(payload_bytes=100, payloads_per_message=2,
                          metadata_record_bytes=64).restore(state)
    assert resumed.record(sizes) == ledger.record(sizes)
    assert resumed.state() == ledger.state() and ledger.state()["cumulative_bytes"] == 2 * (
        4 * 1 + 4 * 3) * 2 * 100
