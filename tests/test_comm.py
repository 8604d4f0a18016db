"""Tests of the communication ledger: group sizes from jit, exact bytes on the host."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from marfl_jax import clock, codec, comm, mixing
from marfl_jax.algorithms import marfl
from marfl_jax.config import Config, ConfigError
from tests.simulate import simulate

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


# A user's own wire: one message per member of a group of two or more, each sent in the time its
# uplink alone takes, and the server's way of combining coded copies.
def one_message_each(sizes, payload_bytes, payloads_per_message):
    messages = int((np.asarray(sizes) > 1).sum())
    per_message = payloads_per_message * payload_bytes
    return comm.WireCost(messages, messages * payloads_per_message, messages * per_message,
                         per_message if messages else 0)


def uplink_only(ids, num_groups, links, message_bytes, server_bps):
    del num_groups, server_bps
    own = jnp.where(ids >= 0, message_bytes / links.uplink_bps, 0.0)
    return clock.RoundTimes(own, own, jnp.max(own))


TINY = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=1, batch_size=8,
              max_iterations=1, checkpoint_every=0, network="uniform", codec="int8")


@pytest.fixture
def own_wires():
    yield comm.WIRE_MODELS
    for name in ("one_message_each", "no_combine", "untimed"):
        comm.WIRE_MODELS.unregister(name)


def test_a_users_own_wire_sets_the_bytes_the_seconds_and_the_coded_combine(own_wires):
    combined = []

    def server_combine(tree, ids, num_groups, roundtrip, unit):
        combined.append(ids.shape)  # At trace time: once per round.
        return mixing.coded_server(tree, ids, num_groups, roundtrip, unit)

    own_wires.register("one_message_each",
                       comm.Wire(one_message_each, uplink_only, server_combine))
    config = dataclasses.replace(TINY, wire="one_message_each").validate()
    (row,), state = simulate(config)
    one_peer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state.params)
    encoded = codec.tree_bytes(codec.CODECS.get("int8"), one_peer, config.codec_block)
    # 3 rounds of 8 present members in pairs: 24 messages of weights + momentum.
    assert row["messages"] == 24 and row["bytes"] == 24 * 2 * encoded
    assert row["max_peer_bytes"] == 2 * encoded
    seconds = 3 * 2 * encoded / (config.uplink_mbps * clock.MBIT)
    np.testing.assert_allclose(row["sim_comm_seconds"], seconds, rtol=1e-5)
    assert combined == [(8,)] * 3


def test_a_wire_without_a_coded_combine_refuses_a_lossy_codec(own_wires):
    own_wires.register("no_combine", comm.Wire(comm.allgather_cost, clock.allgather))
    config = dataclasses.replace(TINY, wire="no_combine", network="none")
    with pytest.raises(ConfigError, match="'no_combine' .* does not say how a group combines"):
        config.validate()  # Asked once, at validation, before any work.
    (row,), _ = simulate(dataclasses.replace(config, codec="float32"))  # Lossless: fine.
    assert row["messages"] == 8 * 3
    with pytest.raises(ValueError, match="needs the wire's way of combining"):
        mixing.mixer(1, roundtrip=lambda t: t)


def test_a_wire_without_seconds_refuses_the_clock(own_wires):
    own_wires.register("untimed", comm.Wire(comm.allgather_cost, None, mixing.coded_allgather))
    with pytest.raises(ConfigError, match="'untimed' .* has no clock timing"):
        dataclasses.replace(TINY, wire="untimed").validate()


def test_every_registered_wire_has_bytes_seconds_and_a_combine():
    assert comm.WIRE_MODELS.names()[:4] == ("allgather", "butterfly", "star", "relay")
    for name in comm.WIRE_MODELS:
        wire = comm.get_wire(name)
        assert wire.seconds is not None and comm.coded_combine(name) is wire.combine
    # RDFL's ring: allgather's bytes and combine, its own (hop by hop) seconds.
    relay, allgather = comm.get_wire("relay"), comm.get_wire("allgather")
    assert relay.cost is allgather.cost and relay.combine is allgather.combine
    assert relay.seconds is clock.relay is not allgather.seconds
