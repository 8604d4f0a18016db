"""Asynchronous Moshpit: the host timeline against hand-computed events, the waves' order, the
device steps against one operation at a time, and the whole run against the synchronous one."""

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marfl_jax import asynchronous, clock, comm, events, runner
from marfl_jax.algorithms import marfl
from marfl_jax.config import Config, ConfigError
from marfl_jax.events import Mix, Train

# N = 4 peers, groups of M = 2, G = 2 rounds on the 2x2 key grid (keys [0, 0, 1, 1]); local
# phases of 1, 2, 3 and 10 s, every exchange 0.5 s, windows of 3 s.
COMPUTE_S = np.array([1.0, 2.0, 3.0, 10.0])


def _timeline(compute_s=COMPUTE_S, window_s=3.0, churn=None):
    rule = marfl.authors_key_rule(4, 2, 2)
    keys = events.Keys(np.asarray(rule.initial_keys, np.int64), rule.group_of, rule.next_key)
    return events.Timeline(keys, 2, 2, window_s, compute_s, lambda members: 0.5, churn=churn)


def test_a_heterogeneous_timeline_meets_the_hand_computed_groups_at_their_seconds():
    # By hand (peer 3's phase takes 10 s): peer 0 is ready at 1 s and opens (round 0, key 0);
    # peer 1 joins at 2 s, the group is full (done 2.5 s; keys -> 0 and 1). Peer 2 opens
    # (0, 1) at 3 s, alone until 6 s. At 2.5 s peers 0 and 1 open (1, 0) and (1, 1), alone
    # until 5.5 s: both train on (done 6.5 and 7.5 s) and meet again in (0, 0) at 7.5 s.
    timeline = _timeline()
    ops = timeline.advance(11.0)
    groups = [(m.peers, m.round, m.close, m.time, m.staleness) for m in ops
              if isinstance(m, Mix) and len(m.peers) > 1]
    assert groups == [
        ((0, 1), 0, 2.0, 2.5, 0),
        ((0, 1), 0, 7.5, 8.0, 0),
        # Peer 3's first phase ends at 10 s: it joins the group peer 2 opened at 9 s (its
        # second phase), one local phase behind.
        ((2, 3), 0, 10.0, 10.5, 1),
        # Round 1 (keys: peer 2 -> 0, peer 3 -> 1): each joins the group peer 0 or 1 opened at
        # 8 s, within its window (until 11 s).
        ((0, 2), 1, 10.5, 11.0, 0),
        ((1, 3), 1, 10.5, 11.0, 1),
    ]
    alone = [(m.peers, m.round, m.close) for m in ops if isinstance(m, Mix) and len(m.peers) == 1]
    assert alone == [((0,), 1, 5.5), ((1,), 1, 5.5), ((2,), 0, 6.0)]
    trains = [(t.peer, t.version, t.time) for t in ops if isinstance(t, Train)]
    assert trains == [(0, 0, 1.0), (1, 0, 2.0), (2, 0, 3.0), (0, 1, 6.5), (1, 1, 7.5),
                      (2, 1, 9.0), (3, 0, 10.0)]
    # Completion order, and nothing done after the horizon is returned yet.
    assert [op.time for op in ops] == sorted(op.time for op in ops)
    later = timeline.advance(12.0)
    assert later and min(op.time for op in later) > 11.0


def test_waves_keep_each_peers_order_and_combine_before_training():
    ops = [op for op in _timeline().advance(11.0)
           if not (isinstance(op, Mix) and len(op.peers) == 1)]
    waves = events.waves(ops)
    assert [sorted(m.peers for m in w.mixes) for w in waves] == [
        [], [(0, 1)], [(0, 1), (2, 3)], [(0, 2), (1, 3)]]
    assert [sorted((t.peer, t.version) for t in w.trains) for w in waves] == [
        [(0, 0), (1, 0), (2, 0), (3, 0)], [(0, 1), (1, 1), (2, 1)], [], []]
    assert [w.size for w in waves] == [4, 3, 4, 4]
    # Each peer's operations in the waves, read in order, are its operations in time order.
    for peer in range(4):
        in_time = [op for op in ops if peer in getattr(op, "peers", (getattr(op, "peer", -1),))]
        in_waves = [op for w in waves for op in (*w.mixes, *w.trains)
                    if peer in getattr(op, "peers", (getattr(op, "peer", -1),))]
        assert in_waves == in_time


def test_timeline_is_a_function_of_its_settings():
    churn = events.Churn(update_fraction=0.7, aggregate_fraction=0.8, dropout=0.2,
                         dropout_timing="mid")
    first = _timeline(churn=churn).advance(60.0)
    replay = _timeline(churn=churn)
    assert replay.advance(30.0) + replay.advance(60.0) == first
    # Churn draws do change who trains.
    assert first != _timeline().advance(60.0)


def test_a_group_timer_gives_the_clocks_round_completion_of_that_group():
    """Each wire's host formula for one group, and its device round run for that group."""
    rng = np.random.default_rng(0)
    n = 12
    links = clock.Links(*(jnp.asarray(x, jnp.float32) for x in (
        rng.uniform(1e5, 1e6, n), rng.uniform(1e5, 1e6, n), rng.uniform(0, 0.1, n),
        rng.uniform(10, 100, n))))
    ids = jnp.asarray([0, 0, 0, 1, 1, -1, 2, 2, 2, 2, 3, 3], jnp.int32)
    for wire in ("allgather", "butterfly", "star", "relay"):
        sim_clock = clock.Clock(links, comm.get_wire(wire), 1e6, 1e6, 1.25e8, 0.0, 64, 4)
        # A member's time depends on its own group only: one round of all four groups gives
        # each group's completion as its members' latest `done`.
        done = np.asarray(jax.jit(sim_clock.round_times, static_argnums=1)(ids, 4).done)
        timers = [asynchronous.group_timer(sim_clock, 4)]  # The host's formula.
        if wire == "allgather":  # A wire without one: its round, run on the CPU per group.
            timers.append(asynchronous.group_timer(
                sim_clock._replace(wire=sim_clock.wire._replace(group_seconds=None)), 4))
        for timer in timers:
            for g in range(4):
                members = tuple(int(p) for p in np.flatnonzero(np.asarray(ids) == g))
                np.testing.assert_allclose(timer(members), done[list(members)].max(),
                                           rtol=1e-5)


def test_asynchronous_flags_are_checked_before_any_run():
    base = Config(asynchronous=True, network="uniform", model="mlp")
    base.validate()
    for change, words in [
        (dict(network="none"), "needs the simulated clock"),
        (dict(algorithm="fedavg"), "--algorithm=fedavg"),
        (dict(mkd=True), "--mkd"),
        (dict(round_timeout_s=5.0), "--round_timeout_s"),
        (dict(availability="markov"), "--availability=markov"),
        (dict(matchmaking_window_s=0.0), "--matchmaking_window_s"),
        (dict(row_every_s=-1.0), "--row_every_s"),
        (dict(wave_layout="rows"), "--wave_layout"),
    ]:
        with pytest.raises(ConfigError, match=words.replace("-", r"\-")):
            dataclasses.replace(base, **change).validate()


SYNC = Config(model="mlp", num_peers=16, group_size=4, key_dim=2, local_batches=2,
              batch_size=8, network="uniform", eval_every=1, eval_peers="all",
              max_iterations=3, target_accuracy=1.0, checkpoint_every=0, plan="fixed")


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.smoke
def test_the_asynchronous_run_with_peers_in_step_is_the_synchronous_run(tmp_path):
    """Every peer at one speed on uniform links and a window that always fills the groups: the
    asynchronous rows, one per iteration's simulated seconds, are the synchronous rows."""
    sync = runner.run(SYNC, str(tmp_path / "sync")).metrics
    first = sync[0]
    iteration_s = first["sim_compute_seconds"] + first["sim_comm_seconds"]
    asynchronous_config = dataclasses.replace(
        SYNC, asynchronous=True, matchmaking_window_s=1.0,
        row_every_s=iteration_s * (1 + 1e-6))  # Above the float32 sums' rounding.
    rows = runner.run(asynchronous_config, str(tmp_path / "async")).metrics
    assert len(rows) == len(sync) == SYNC.max_iterations
    compared = 0
    for a, s in zip(rows, sync, strict=True):
        assert a["waves"] == SYNC.key_dim + 1  # Local phases, then one wave per round.
        assert a["staleness_max"] == 0 and a["alone"] == 0
        assert a["local_phases"] == SYNC.num_peers
        for field in sorted(set(a) & set(s) - {"seconds", "sim_seconds",
                                              "cumulative_sim_seconds"}):
            chex.assert_trees_all_close(a[field], s[field], rtol=2e-5, atol=1e-6,
                                        custom_message=f"iteration {s['iteration']}: {field}")
            compared += 1
        # No barriers: the simulated time is the synchronous one without its coordination.
        np.testing.assert_allclose(
            a["cumulative_sim_seconds"],
            s["cumulative_sim_seconds"] - (s["iteration"] + 1) * s["sim_coordination_seconds"],
            rtol=1e-5)
    assert compared >= 3 * 15  # Accuracy, bytes, losses, counts, consensus ... in each row.


def _wave_steps(config, layout):
    from marfl_jax import assemble
    from marfl_jax import data as data_lib
    from marfl_jax import plan as plan_lib
    from tests.simulate import NUM_CLASSES, synthetic_data

    data = synthetic_data(config)
    sample = data_lib.preprocess(data.x_train[:1])
    model = assemble.build_model(config, NUM_CLASSES, plan_lib.fixed(config))
    made = assemble.pieces(config, model, sample)
    state = assemble.initial_state(config, model, made.sim, sample)
    steps = asynchronous.WaveSteps(made.sim, jax.eval_shape(lambda: state), data, config.seed,
                                   layout)
    return made.sim, state, steps


def _run_waves(steps, state, waves):
    for w, wave in enumerate(waves):
        if wave.mixes:
            state = steps.mix(state, wave.mixes, w)
        if wave.trains:
            state, _ = steps.train(state, wave.trains)
    return state


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["mean", "trimmed_mean", "centered_clip_previous"])
def test_waves_in_buckets_and_in_masks_equal_one_operation_at_a_time(rule):
    """A heterogeneous timeline's operations, run as dependency waves over buckets, one by one
    and as waves over all peers with masks: the same models (and rule state)."""
    extra = dict(aggregator_f=1) if rule == "trimmed_mean" else (
        dict(clip_tau=1.0) if rule == "centered_clip_previous" else {})
    n, m, d = (8, 2, 3) if rule == "mean" else (16, 4, 2)
    config = Config(model="mlp", num_peers=n, group_size=m, key_dim=d, local_batches=1,
                    batch_size=4, network="lognormal", compute_sigma=1.0, asynchronous=True,
                    aggregator=rule, byzantine_fraction=0.2 if rule != "mean" else 0.0,
                    attack="sign_flip" if rule != "mean" else "none", **extra)
    sim, state, bucket_steps = _wave_steps(config, "buckets")
    timeline = asynchronous.make_timeline(sim, window_s=1.0, group_size=m,
                                          has_data=np.ones(n, bool), churn=None, seed=0)
    ops = [op for op in timeline.advance(30.0) if not (isinstance(op, Mix) and len(op.peers) < 2)]
    waves = events.waves(ops)
    assert len(waves) < len(ops) and any(len(w.mixes) > 1 for w in waves)
    assert any(m.staleness > 0 for m in ops if isinstance(m, Mix))
    copy = lambda s: jax.tree.map(jnp.array, s)  # noqa: E731  The steps donate their input.
    in_buckets = _run_waves(bucket_steps, copy(state), waves)
    # One operation per wave (in a bucket of its own peers), numbered as in `waves` (the
    # attack key is the wave's number).
    number = {id(op): w for w, wave in enumerate(waves) for op in (*wave.mixes, *wave.trains)}
    one_by_one = copy(state)
    for op in ops:
        if isinstance(op, Mix):
            one_by_one = bucket_steps.mix(one_by_one, (op,), number[id(op)])
        else:
            one_by_one, _ = bucket_steps.train(one_by_one, (op,))
    chex.assert_trees_all_close(in_buckets, one_by_one, rtol=1e-5, atol=1e-6)
    _, _, mask_steps = _wave_steps(config, "masks")
    chex.assert_trees_all_close(_run_waves(mask_steps, copy(state), waves), one_by_one,
                                rtol=1e-5, atol=1e-6)
    # The plan's chunks of 3 peers inside each bucket, read and written back in place.
    _, _, chunked = _wave_steps(dataclasses.replace(config, peer_chunk=3), "buckets")
    chex.assert_trees_all_close(_run_waves(chunked, copy(state), waves), one_by_one,
                                rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # The fast tier's time: the in-step run covers the steps over all peers.
def test_groups_combined_in_buckets_equal_one_group_at_a_time():
    """A lighter share of the test above: a heterogeneous timeline's groups (training
    left out; the peers start from different models) in dependency waves over buckets, and one
    group at a time."""
    config = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, network="lognormal",
                    compute_sigma=1.0, asynchronous=True)
    sim, state, steps = _wave_steps(config, "buckets")
    timeline = asynchronous.make_timeline(sim, window_s=1.0, group_size=2,
                                          has_data=np.ones(8, bool), churn=None, seed=0)
    mixes = [op for op in timeline.advance(30.0) if isinstance(op, Mix) and len(op.peers) > 1]
    waves = events.waves(mixes)
    assert len(waves) < len(mixes) and {len(w.mixes) for w in waves} >= {1, 2}
    noise = jax.random.split(jax.random.key(1), 2)
    state = state._replace(params=jax.tree.map(
        lambda x: x + jax.random.normal(noise[0], x.shape), state.params),
        opt_state=jax.tree.map(lambda x: x + jax.random.normal(noise[1], x.shape),
                               state.opt_state))
    copy = lambda s: jax.tree.map(jnp.array, s)  # noqa: E731  The steps donate their input.
    in_waves = _run_waves(steps, copy(state), waves)
    one_by_one = copy(state)
    for op in mixes:
        one_by_one = steps.mix(one_by_one, (op,), 0)
    chex.assert_trees_all_close(in_waves, one_by_one, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError):  # The groups did mix the models.
        chex.assert_trees_all_close(in_waves.params, state.params, rtol=1e-3)




RESUMED = Config(model="mlp", num_peers=16, group_size=4, key_dim=2, local_batches=2,
                 batch_size=8, network="lognormal", compute_sigma=1.0, asynchronous=True,
                 matchmaking_window_s=1.0, row_every_s=4.0, eval_every=3, eval_peers="3",
                 max_iterations=8, target_accuracy=1.0, checkpoint_every=2, plan="fixed",
                 update_fraction=0.8, dropout=0.2, dropout_timing="mid")


@pytest.mark.slow
def test_an_asynchronous_run_killed_and_resumed_writes_the_uninterrupted_rows(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    straight = runner.run(RESUMED, str(tmp_path / "straight")).metrics
    assert len(straight) >= 8 and max(r["staleness_max"] for r in straight) > 0
    workdir = tmp_path / "killed"
    skip = {"workdir", "data_dir", "conv_impl"}
    command = [sys.executable, "-m", "launch.train", f"--workdir={workdir}"] + [
        f"--{f.name}={getattr(RESUMED, f.name)}" for f in dataclasses.fields(RESUMED)
        if f.name not in skip]
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(_rows(workdir)) < len(straight)
    resumed = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr

    def without_seconds(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert without_seconds(_rows(workdir)) == without_seconds(straight)
    # Run again once finished: nothing is added.
    again = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert without_seconds(_rows(workdir)) == without_seconds(straight)
