"""Tests of the communication ledger: counts in jit, exact bytes on the host."""

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from marfl_jax import comm
from marfl_jax.algorithms import marfl


class AllgatherTest(chex.TestCase, parameterized.TestCase):

    @parameterized.parameters((4, 2), (4, 3), (5, 3), (2, 6))
    def test_full_participation_bytes_equal_formula(self, group_size, key_dim):
        num_peers = group_size**key_dim
        rule = marfl.authors_key_rule(num_peers, group_size, key_dim)
        schedule = marfl.moshpit_schedule(jnp.ones(num_peers, bool), rule, key_dim)
        messages = comm.allgather_messages(schedule, rule.num_groups)
        payload_bytes = 4 * 1_199_882  # The paper's CNN in float32.
        ledger = comm.Ledger(payload_bytes=payload_bytes, payloads_per_message=2)
        row = ledger.record(np.asarray(messages))
        # N * G * (M - 1) * 2S at full participation (DESIGN.md section 3.6).
        expected = num_peers * key_dim * (group_size - 1) * 2 * payload_bytes
        self.assertEqual(row["bytes"], expected)
        self.assertEqual(row["payloads"], num_peers * key_dim * (group_size - 1) * 2)
        self.assertEqual(row["max_peer_bytes"], key_dim * (group_size - 1) * 2 * payload_bytes)
        self.assertEqual(ledger.record(np.asarray(messages))["cumulative_bytes"], 2 * expected)

    @chex.variants(with_jit=True, without_jit=True)
    def test_absent_and_lonely_peers_receive_nothing(self):
        schedule = jnp.array([[0, 0, 1, -1, 2, 2, 2]], jnp.int32)
        messages = self.variant(lambda s: comm.allgather_messages(s, 3))(schedule)
        chex.assert_trees_all_equal(messages, jnp.array([1, 1, 0, 0, 2, 2, 2], jnp.int32))

    def test_bytes_are_exact_python_ints_beyond_int32(self):
        ledger = comm.Ledger(payload_bytes=4 * 1_199_882, payloads_per_message=2)
        row = ledger.record(np.full(10_000, 3 * 9, np.int32))
        self.assertIsInstance(row["bytes"], int)
        self.assertEqual(row["bytes"], 10_000 * 27 * 2 * 4 * 1_199_882)
        self.assertGreater(row["bytes"], 2**40)

    def test_tree_bytes(self):
        tree = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float16)}
        self.assertEqual(comm.tree_bytes(tree), 3 * 4 * 4 + 5 * 2)
