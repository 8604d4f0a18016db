"""The simulated clock: closed forms at uniform links, a per-pair loop at random links, the
deadline, and the rows of runs with --network."""

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marfl_jax import assemble, clock, comm, mixing, network, runner
from marfl_jax.config import Config, ConfigError

CNN_PAYLOAD = 4_799_528  # The paper CNN's float32 weights, bytes.
MLP_PAYLOAD = 4 * (784 * 200 + 200 + 200 * 10 + 10)


def uniform(n, up_mbps=10.0, down_mbps=10.0, latency_s=0.0, speed=100.0):
    return clock.Links(jnp.full(n, up_mbps * clock.MBIT), jnp.full(n, down_mbps * clock.MBIT),
                       jnp.full(n, latency_s), jnp.full(n, speed))


def full_schedule(config):
    algorithm = assemble.algorithm(config)
    present = jnp.ones((algorithm.num_rounds, config.num_peers), bool)
    return algorithm, algorithm.schedule(present, jax.random.key(0))


def test_marfl_4x4x4_cnn_round_at_10_mbits_is_23_04_s_plus_latency():
    algorithm, schedule = full_schedule(Config(num_peers=64))
    links = uniform(64, latency_s=0.05)
    for ids in schedule:  # Every peer receives 3 messages of 2 x 4,799,528 B.
        times = clock.allgather(ids, algorithm.num_groups, links, 2 * CNN_PAYLOAD, 0.0)
        expected = 3 * 2 * CNN_PAYLOAD * 8 / 10e6 + 0.05
        assert expected == pytest.approx(23.04 + 0.05, abs=5e-3)  # 23.0377 s + latency.
        chex.assert_trees_all_close(times.own, jnp.full(64, expected), rtol=1e-6)
        chex.assert_trees_all_close(times.completion, expected, rtol=1e-6)


def _pairwise_allgather(ids, up, down, latency, message_bytes):
    """Per-pair loop: flow i -> j takes (l_i + l_j)/2 + M / min(u_i/(n-1), d_j/(n-1)) (done),
    or with each end's own link alone (own)."""
    own, done = np.zeros(len(ids)), np.zeros(len(ids))
    for j in range(len(ids)):
        mates = [i for i in range(len(ids)) if ids[i] == ids[j] and i != j and ids[j] >= 0]
        n = len(mates) + 1
        for i in mates:
            latency_ij = (latency[i] + latency[j]) / 2
            end = latency_ij + message_bytes / min(up[i] / (n - 1), down[j] / (n - 1))
            done[j] = max(done[j], end)  # j receives.
            done[i] = max(done[i], end)  # i sends.
            own[j] = max(own[j], latency_ij + message_bytes * (n - 1) / down[j])
            own[i] = max(own[i], latency_ij + message_bytes * (n - 1) / up[i])
    return own, done


def test_allgather_equals_a_per_pair_loop_on_random_links():
    rng = np.random.default_rng(0)
    n, groups = 23, 5
    ids = rng.integers(-1, groups, n).astype(np.int32)
    up, down = rng.uniform(1e5, 1e7, (2, n))
    latency = rng.uniform(0, 0.2, n)
    links = clock.Links(*(jnp.asarray(x, jnp.float32) for x in (up, down, latency, up)))
    times = clock.allgather(jnp.asarray(ids), groups, links, 3e6, 0.0)
    own, done = _pairwise_allgather(ids, up, down, latency, 3e6)
    chex.assert_trees_all_close(times.own, own.astype(np.float32), rtol=1e-5)
    chex.assert_trees_all_close(times.done, done.astype(np.float32), rtol=1e-5)
    chex.assert_trees_all_close(times.completion, np.float32(done.max()), rtol=1e-5)
    assert np.all(own <= done)


def test_the_slowest_member_bounds_its_group_and_only_its_group():
    algorithm, schedule = full_schedule(Config(num_peers=16, group_size=4, key_dim=2))
    ids = schedule[0]
    links = uniform(16)
    links = links._replace(uplink_bps=links.uplink_bps.at[5].set(1 * clock.MBIT))
    times = clock.allgather(ids, algorithm.num_groups, links, 1e6, 0.0)
    mates = np.asarray(ids) == int(ids[5])
    slow = 1e6 * 3 * 8 / 1e6  # Peer 5's uplink split over its 3 flows.
    fast = 1e6 * 3 * 8 / 10e6
    chex.assert_trees_all_close(times.done[mates], jnp.full(4, slow), rtol=1e-6)
    chex.assert_trees_all_close(times.done[~mates], jnp.full(12, fast), rtol=1e-6)
    chex.assert_trees_all_close(times.completion, slow, rtol=1e-6)
    # On its own links only peer 5 is slow: the deadline would cut it off, not its mates.
    own = np.where(np.arange(16) == 5, slow, fast)
    chex.assert_trees_all_close(times.own, jnp.asarray(own, jnp.float32), rtol=1e-6)


def test_the_server_link_bounds_fedavg():
    algorithm, schedule = full_schedule(Config(num_peers=64, algorithm="fedavg"))
    links = uniform(64, up_mbps=100.0, down_mbps=100.0, latency_s=0.01)
    server = 100 * clock.MBIT  # Shared by 64 clients: 1.5625 Mbit/s each, below their links.
    times = clock.star(schedule[0], 1, links, 2e6, server)
    one_way = 0.01 + 2e6 * 64 / server
    chex.assert_trees_all_close(times.completion, 2 * one_way, rtol=1e-6)
    fast_server = clock.star(schedule[0], 1, links, 2e6, 1e12)  # Then the clients' links bound.
    chex.assert_trees_all_close(fast_server.completion, 2 * (0.01 + 2e6 / (100 * clock.MBIT)),
                                rtol=1e-6)


def test_the_ring_relays_hops_add_up():
    algorithm, schedule = full_schedule(Config(num_peers=8, algorithm="rdfl"))
    assert comm.get_wire(algorithm.wire) == comm.Wire(comm.allgather_cost, clock.relay,
                                                       mixing.coded_allgather,
                                                       group_seconds=clock.relay_group)
    links = uniform(8, latency_s=0.02)
    hop = 0.02 + 1e6 * 8 / 10e6
    times = clock.relay(schedule[0], algorithm.num_groups, links, 1e6, 0.0)
    chex.assert_trees_all_close(times.completion, 7 * hop, rtol=1e-6)
    # Peer 3 absent: one arc of the other 7 (4..7, 0..2): 6 hops.
    present = jnp.ones((1, 8), bool).at[0, 3].set(False)
    arcs = algorithm.schedule(present, jax.random.key(0))
    times = clock.relay(arcs[0], algorithm.num_groups, links, 1e6, 0.0)
    chex.assert_trees_all_close(times.completion, 6 * hop, rtol=1e-6)
    assert float(times.own[3]) == 0.0
    # One slow link slows every hop of its arc.
    slow = links._replace(downlink_bps=links.downlink_bps.at[6].set(1 * clock.MBIT))
    times = clock.relay(schedule[0], algorithm.num_groups, slow, 1e6, 0.0)
    chex.assert_trees_all_close(times.completion, 7 * (0.02 + 1e6 * 8 / 1e6), rtol=1e-6)


def test_butterfly_is_two_phases_of_chunks():
    algorithm, schedule = full_schedule(Config(num_peers=16, group_size=4, key_dim=2,
                                               wire="butterfly"))
    times = clock.butterfly(schedule[0], algorithm.num_groups, uniform(16), 4e6, 0.0)
    chex.assert_trees_all_close(times.completion, 2 * (4e6 / 4) * 3 * 8 / 10e6, rtol=1e-6)


def test_compute_waits_for_the_slowest_updating_peer():
    links = uniform(4)._replace(examples_per_s=jnp.array([100.0, 50.0, 10.0, 200.0]))
    updating = jnp.array([True, True, False, True])
    chex.assert_trees_all_close(clock.compute_seconds(updating, 64, links), 64 / 50.0)


# -- Runs with --network.

TINY = Config(model="mlp", num_peers=16, group_size=4, key_dim=2, local_batches=1,
              batch_size=8, eval_every=2, eval_peers="3", max_iterations=4,
              target_accuracy=1.0, checkpoint_every=0)
SIM_FIELDS = ("sim_seconds", "sim_compute_seconds", "sim_comm_seconds",
              "sim_coordination_seconds", "stragglers", "cumulative_sim_seconds")


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def _write_trace(path, slow=(3, 7), n=16):
    lines = ["uplink_mbps,downlink_mbps,latency_ms,examples_per_s"]
    lines += [f"{1.0 if i in slow else 20.0},50,10,{200.0}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_rows_gain_the_clock_and_keep_everything_else(tmp_path):
    plain = runner.run(TINY, str(tmp_path / "plain")).metrics
    assert not any(name in row for row in plain for name in SIM_FIELDS)
    config = dataclasses.replace(TINY, network="uniform", uplink_mbps=10.0, downlink_mbps=10.0,
                                 latency_ms=20.0, examples_per_s=100.0)
    timed = runner.run(config, str(tmp_path / "timed"))
    rows = timed.metrics
    # The clock without a deadline changes no other field.
    for a, b in zip(plain, rows, strict=True):
        assert {k: v for k, v in b.items() if k not in SIM_FIELDS and k != "seconds"} == {
            k: v for k, v in a.items() if k != "seconds"}
    # 2 rounds of groups of 4: 3 flows of 2 payloads per round, plus the coordination.
    round_s = 0.02 + 3 * 2 * MLP_PAYLOAD * 8 / 10e6
    for row in rows:
        assert row["sim_compute_seconds"] == pytest.approx(8 / 100.0, rel=1e-6)
        assert row["sim_comm_seconds"] == pytest.approx(2 * round_s, rel=1e-6)
        assert row["sim_coordination_seconds"] == pytest.approx(
            clock.PARTICIPATION_COUNT_S + 2 * 4 * clock.BARRIER_POLL_S, rel=1e-6)
        assert row["stragglers"] == 0
    np.testing.assert_allclose(np.cumsum([r["sim_seconds"] for r in rows]),
                               [r["cumulative_sim_seconds"] for r in rows], rtol=1e-12)
    assert timed.summary["cumulative_sim_seconds"] == rows[-1]["cumulative_sim_seconds"]
    assert timed.summary["sim_seconds_to_target"] is None


@pytest.mark.slow
def test_the_clock_times_the_encoded_messages(tmp_path):
    config = dataclasses.replace(TINY, network="uniform", uplink_mbps=10.0, downlink_mbps=10.0,
                                 latency_ms=20.0, codec="int8", codec_block=256,
                                 share_momentum=False, max_iterations=1)
    (row,) = runner.run(config, str(tmp_path)).metrics
    # int8: one byte per value and a 4-byte scale per 256 values of each leaf; weights only.
    encoded = sum(n + 4 * -(-n // 256) for n in (784 * 200, 200, 200 * 10, 10))
    assert row["bytes"] == 16 * 2 * 3 * encoded
    assert row["sim_comm_seconds"] == pytest.approx(2 * (0.02 + 3 * encoded * 8 / 10e6),
                                                    rel=1e-6)


@pytest.mark.slow
def test_a_deadline_cuts_off_the_slow_peers_only_and_the_same_per_seed(tmp_path):
    trace = _write_trace(tmp_path / "trace.csv")
    config = dataclasses.replace(TINY, network="trace", network_trace=trace,
                                 round_timeout_s=2.0)
    # Fast peers: 3 flows of 2 x 637,640 B at 20 Mbit/s up / 50 down: ~1.5 s. Peers 3 and 7
    # at 1 Mbit/s up: ~30 s, past the deadline; so are none of the others.
    rows = runner.run(config, str(tmp_path / "a")).metrics
    for row in rows:
        assert row["stragglers"] == 2 and row["present_peers"] == 14
        assert row["sim_comm_seconds"] == pytest.approx(2.0 + (0.01 + 3 * 2 * MLP_PAYLOAD * 8
                                                                / 20e6), rel=1e-5)
        # Round 0: groups of 4 with two groups of 3; round 1 without peers 3 and 7.
        assert row["bytes"] < 16 * 2 * 3 * 2 * MLP_PAYLOAD
    again = runner.run(config, str(tmp_path / "b")).metrics
    assert _strip(rows) == _strip(again)


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.slow
def test_resume_gives_the_same_clock(tmp_path):
    config = dataclasses.replace(TINY, network="lognormal", round_timeout_s=3.0,
                                 checkpoint_every=1, max_iterations=4)
    straight = runner.run(config, str(tmp_path / "straight")).metrics
    # Stopped after iteration 2 (evaluated in both runs: the last one of a run always is).
    runner.run(dataclasses.replace(config, max_iterations=3), str(tmp_path / "resumed"))
    runner.run(config, str(tmp_path / "resumed"))
    assert _rows(tmp_path / "resumed") == _strip(straight)
    assert any(r["stragglers"] > 0 for r in straight)  # The deadline did cut someone off.


def test_lognormal_profiles_are_drawn_from_the_seed():
    config = dataclasses.replace(TINY, network="lognormal")
    a, b = network.make_links(config), network.make_links(config)
    c = network.make_links(dataclasses.replace(config, seed=1))
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a.uplink_bps, c.uplink_bps)
    median = np.median(a.uplink_bps) / clock.MBIT
    assert 3 < median < 30  # Around the flag's 10 Mbit/s.


@pytest.mark.parametrize("change, message", [
    (dict(network="trace"), "--network=trace needs --network_trace"),
    (dict(network="trace", network_trace="/nonexistent.csv"), "no such file"),
    (dict(round_timeout_s=5.0), "--round_timeout_s needs the clock"),
    (dict(network="uniform", network_trace="x.csv"), "only with --network=trace"),
    (dict(network="fast"), "--network='fast' is not allowed"),
])
def test_bad_network_flags_are_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TINY, **change).validate()


def test_bad_traces_are_refused_by_name(tmp_path):
    short = _write_trace(tmp_path / "short.csv", n=4)
    with pytest.raises(ConfigError, match="has 4 rows; --num_peers=16"):
        dataclasses.replace(TINY, network="trace", network_trace=short).validate()
    bad = tmp_path / "bad.csv"
    bad.write_text("uplink_mbps,latency_ms,examples_per_s\n1,2,3\n")
    with pytest.raises(ConfigError, match="lacks the columns \\['downlink_mbps'\\]"):
        network.load_trace(str(bad), 1)
    zero = tmp_path / "zero.csv"
    zero.write_text("uplink_mbps,downlink_mbps,latency_ms,gflops\n0,2,3,4\n")
    with pytest.raises(ConfigError, match="column uplink_mbps, row 1"):
        network.load_trace(str(zero), 1)


def test_a_gflops_trace_uses_the_models_training_flops(tmp_path):
    trace = tmp_path / "gflops.csv"
    trace.write_text("uplink_mbps,downlink_mbps,latency_ms,gflops\n" + "10,10,0,2\n" * 16)
    config = dataclasses.replace(TINY, network="trace", network_trace=str(trace))
    links = network.make_links(config, lambda: 1e6)
    chex.assert_trees_all_close(links.examples_per_s, np.full(16, 2e9 / 1e6, np.float32))
