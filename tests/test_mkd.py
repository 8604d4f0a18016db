"""Tests of Moshpit Knowledge Distillation: mates tables, teacher choice, the loss and its
schedule, the batched teacher passes against a per-peer loop, the ledger, and runs."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from marfl_jax import assemble, comm, local, mkd, models, runner
from marfl_jax.algorithms import marfl
from marfl_jax.config import Config, ConfigError

NUM_CLASSES = 5


def _mates_reference(group_ids):
    """Per peer: its group mates sorted by peer id (a Python loop)."""
    return [sorted(q for q in range(len(group_ids)) if q != p and group_ids[q] == group_ids[p])
            if group_ids[p] >= 0 else [] for p in range(len(group_ids))]


class TestGroupMates:

    @pytest.mark.parametrize("group_ids", [
        [0, 0, 0, 0, 1, 1, 1, 1],
        [2, -1, 0, 2, 0, 1, 2, -1, 1, 0, 3],  # Absent peers, a group of one, unequal sizes.
        [-1, -1, -1],
    ])
    def test_matches_a_loop_and_is_symmetric(self, group_ids):
        ids = jnp.asarray(group_ids, jnp.int32)
        max_mates = 3
        mates = mkd.group_mates(ids, num_groups=4, max_mates=max_mates)
        table, valid = np.asarray(mates.ids), np.asarray(mates.valid)
        slot = np.asarray(mates.slot_of_self)
        for p, expected in enumerate(_mates_reference(group_ids)):
            assert table[p][valid[p]].tolist() == expected
            assert valid[p].tolist() == [c < len(expected) for c in range(max_mates)]
            for c in np.flatnonzero(valid[p]):
                q = table[p, c]
                assert table[q, slot[p, c]] == p and valid[q, slot[p, c]]


class TestTeacherSelection:

    def test_teacher_counts_follow_the_authors_int(self):
        np.testing.assert_array_equal(mkd.teacher_counts(0.4, 6), [0, 1, 1, 1, 1, 2, 2])
        np.testing.assert_array_equal(mkd.teacher_counts(1.0, 3), [0, 1, 2, 3])
        np.testing.assert_array_equal(mkd.teacher_counts(0.5, 4), [0, 1, 1, 1, 2])

    def test_lowest_kl_valid_candidates_with_ties_to_the_lower_peer(self):
        scores = jnp.array([[0.3, 0.1, 0.2, 0.05],  # Slot 3 is not a valid candidate.
                            [0.2, 0.2, 0.2, 0.9],  # Ties: the lower slots win.
                            [0.5, 0.4, 0.0, 0.0],  # No candidates at all.
                            [0.7, 0.6, 0.1, 0.4]])
        valid = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
        chosen = mkd.select_teachers(scores, valid, np.array([0, 1, 1, 2, 2]))
        np.testing.assert_array_equal(chosen, [[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0],
                                               [0, 0, 1, 1]])


class TestLoss:

    def test_kl_matches_the_formula_and_vanishes_for_equal_logits(self):
        rng = np.random.default_rng(0)
        t, s = rng.normal(size=(2, 4, NUM_CLASSES))
        pt = np.exp(t / 3) / np.exp(t / 3).sum(-1, keepdims=True)
        ps = np.exp(s / 3) / np.exp(s / 3).sum(-1, keepdims=True)
        expected = (pt * (np.log(pt) - np.log(ps))).sum(-1).mean()
        np.testing.assert_allclose(mkd.kl_divergence(t, s, 3.0), expected, rtol=1e-5)
        assert float(mkd.kl_divergence(t, t, 3.0)) == pytest.approx(0.0, abs=1e-7)

    def test_blending_schedule_and_modes(self):
        d = mkd.Distillation(iterations=40)
        assert [d.weight(t) for t in (0, 10, 39, 40, 60)] == [1.0, 0.75, 1 - 39 / 40, 0.0, 0.0]
        assert d.active(39) and not d.active(40)
        rng = np.random.default_rng(1)
        s, t = jnp.asarray(rng.normal(size=(2, 6, NUM_CLASSES)), jnp.float32)
        y = jnp.asarray(rng.integers(0, NUM_CLASSES, 6))
        kl = 9.0 * mkd.kl_divergence(t, s, 3.0)
        ce = local.cross_entropy(s, y)
        loss = mkd.distillation_loss
        np.testing.assert_allclose(loss(s, t, y, 0.75, d), 0.75 * kl + 0.25 * ce, rtol=1e-6)
        np.testing.assert_allclose(loss(s, t, y, 0.75, d._replace(blend=False)), kl + ce,
                                   rtol=1e-6)
        np.testing.assert_allclose(loss(s, t, y, 0.75, d._replace(include_ce=False)), kl,
                                   rtol=1e-6)


def _mlp_setup(num_peers, seed=0, k=2, batch=3):
    model = models.MLP(num_classes=NUM_CLASSES, hidden=(7,))
    keys = jax.random.split(jax.random.key(seed), num_peers)
    x = jnp.zeros((1, 4, 4, 1))
    params = jax.vmap(lambda key: model.init(key, x)["params"])(keys)
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(num_peers, k, batch, 4, 4, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, size=(num_peers, k, batch)), jnp.int32)

    def apply_fn(p, inputs, rng=None):
        return model.apply({"params": p}, inputs)

    return params, images, labels, apply_fn


def _peer(tree, p):
    return jax.tree.map(lambda x: x[p], tree)


class TestDistillRound:

    def test_batched_teacher_logits_equal_a_per_pair_loop(self):
        group_ids = jnp.array([1, 0, 1, 1, -1, 0, 2], jnp.int32)
        params, images, _, apply_fn = _mlp_setup(7)
        mates = mkd.group_mates(group_ids, 3, max_mates=2)
        student, teachers = mkd.teacher_logits(params, images, mates, apply_fn=apply_fn)
        for p in range(7):
            for b in range(images.shape[1]):
                np.testing.assert_allclose(student[p, b], apply_fn(_peer(params, p),
                                                                   images[p, b]), atol=1e-5)
            for c in np.flatnonzero(mates.valid[p]):
                q = int(mates.ids[p, c])
                for b in range(images.shape[1]):
                    np.testing.assert_allclose(teachers[p, c, b],
                                               apply_fn(_peer(params, q), images[p, b]),
                                               atol=1e-5)

    @pytest.mark.parametrize("fraction", [pytest.param(0.4, marks=pytest.mark.slow), 1.0])
    def test_equals_a_per_peer_reference(self, fraction):
        group_ids = jnp.array([0, 0, 0, 0, -1, 1, 1, 2], jnp.int32)
        params, images, labels, apply_fn = _mlp_setup(8, seed=3)
        optimizer = local.momentum_sgd(0.1, 0.9)
        opt_state = jax.vmap(optimizer.init)(params)
        d = mkd.Distillation(teacher_fraction=fraction, batches=images.shape[1])
        new_params, _, stats = mkd.distill_round(
            params, opt_state, group_ids, images, labels, jnp.float32(0.6), distillation=d,
            num_groups=3, max_mates=3, apply_fn=apply_fn, optimizer=optimizer)
        for p, mates in enumerate(_mates_reference(np.asarray(group_ids).tolist())):
            student = _peer(params, p)
            if not mates:  # Absent or alone: untouched.
                chex.assert_trees_all_equal(_peer(new_params, p), student)
                assert not bool(stats.distilled[p])
                continue
            logits = {q: [apply_fn(_peer(params, q), images[p, b]) for b in range(2)]
                      for q in [p, *mates]}
            kl = {q: sum(float(mkd.kl_divergence(logits[q][b], logits[p][b], 3.0))
                         for b in range(2)) for q in mates}
            keep = sorted(mates, key=lambda q: kl[q])[:max(1, int(fraction * len(mates)))]
            state = optimizer.init(student)
            for b in range(2):
                target = sum(logits[q][b] for q in keep) / len(keep)
                grads = jax.grad(lambda w, x, t, y: mkd.distillation_loss(
                    apply_fn(w, x), t, y, 0.6, d))(student, images[p, b], target, labels[p, b])
                updates, state = optimizer.update(grads, state, student)
                student = optax.apply_updates(student, updates)
            chex.assert_trees_all_close(_peer(new_params, p), student, atol=1e-5)
            assert int(stats.teachers[p]) == len(keep)

    @pytest.mark.slow
    def test_a_teacher_identical_to_the_student_teaches_nothing(self):
        params, images, labels, apply_fn = _mlp_setup(2)
        params = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), params)  # Twins.
        optimizer = local.momentum_sgd(0.1, 0.9)
        new_params, _, stats = mkd.distill_round(
            params, jax.vmap(optimizer.init)(params), jnp.array([0, 0]), images, labels,
            jnp.float32(1.0), distillation=mkd.Distillation(batches=2), num_groups=1,
            max_mates=1, apply_fn=apply_fn, optimizer=optimizer)
        np.testing.assert_allclose(stats.teacher_kl, 0.0, atol=1e-7)
        assert bool(stats.distilled.all())
        chex.assert_trees_all_close(new_params, params, atol=1e-7)  # lambda = 1: KL only.


class TestGroupSizeBounds:

    @pytest.mark.parametrize("n,m,d", [(64, 4, 3), (100, 4, 3), (125, 4, 3), (125, 3, 4),
                                       (125, 5, 3), (27, 2, 5)])
    def test_authors_groups_never_exceed_the_bound_under_churn(self, n, m, d):
        rule = marfl.authors_key_rule(n, m, d)
        assert rule.max_group_size == m
        schedule = jax.jit(lambda present: marfl.moshpit_schedule(present, rule))
        for seed in range(30):
            # Churn as churn.py draws it: a peer that leaves does not return this iteration.
            leaves_at = jax.random.randint(jax.random.key(seed), (n,), 0, 2 * d)
            present = jnp.arange(d)[:, None] < leaves_at[None]
            sizes = comm.member_sizes(schedule(present), rule.num_groups)
            assert int(sizes.max()) <= m

    def test_unbounded_bucket_rules_are_flagged(self):
        assert marfl.authors_key_rule(10, 4, 2).max_group_size is None  # 3 buckets < M.
        assert marfl.mixed_radix_key_rule(100, (4, 5, 5)).max_group_size == 5
        algorithm = assemble.algorithm(Config(num_peers=10, group_size=4, key_dim=2))
        assert algorithm.max_group_size == 10


class TestLedgerAndRuns:

    def test_a_kd_iteration_costs_three_halves(self):
        n, m, d, s = 64, 4, 3, 4 * 1_199_882
        sizes = np.full((d, n), m)
        plain = comm.Ledger(s, 2).record(sizes)
        kd = comm.Ledger(s, 2).record(sizes, distilled=True)
        assert kd["bytes"] == n * d * (m - 1) * 3 * s
        assert 2 * kd["bytes"] == 3 * plain["bytes"] and kd["payloads"] * 2 == plain[
            "payloads"] * 3
        assert kd["mkd_bytes"] == n * d * (m - 1) * s and plain["mkd_bytes"] == 0

    @pytest.mark.slow
    @pytest.mark.parametrize("changes", [
        dict(), dict(dropout=0.5), dict(dropout=0.5, dropout_timing="mid"),
        dict(availability="markov", mean_on_iterations=2.0, mean_off_iterations=2.0,
             mkd_no_blending=True, mkd_teacher_fraction=1.0),
        dict(num_peers=10, group_size=4, key_dim=2),  # Buckets; unequal groups.
    ])
    def test_mkd_runs_under_churn(self, changes, tmp_path):
        config = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=2,
                        batch_size=8, eval_every=2, eval_peers="all", max_iterations=3,
                        target_accuracy=1.0, checkpoint_every=0, mkd=True, mkd_iterations=2,
                        mkd_batches=2)
        config = dataclasses.replace(config, **changes)
        rows = runner.run(config, str(tmp_path)).metrics
        assert [("distill_weight" in r) for r in rows] == [True, True, False]
        expected_weights = [1.0, 1.0] if config.mkd_no_blending else [1.0, 0.5]
        assert [r["distill_weight"] for r in rows[:2]] == expected_weights
        for row in rows[:2]:
            assert 3 * row["mkd_bytes"] == row["bytes"]  # allgather: 1 of 3 payloads.
            assert np.isfinite(row["distill_loss"]) and row["distilled_peers"] <= row[
                "present_peers"]
        assert rows[2]["mkd_bytes"] == 0
        assert np.isfinite(rows[-1]["accuracy"])

    @pytest.mark.slow
    def test_full_participation_distils_every_peer_then_averages_exactly(self, tmp_path):
        config = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=1,
                        batch_size=8, eval_every=1, eval_peers="all", max_iterations=1,
                        target_accuracy=1.0, checkpoint_every=0, mkd=True, mkd_batches=1)
        row = runner.run(config, str(tmp_path)).metrics[0]
        assert row["distilled_peers"] == 8 and row["distill_teachers"] == 1
        assert row["consensus_after"] < 1e-10 < row["consensus_before"]
        assert row["accuracy_std"] == 0.0  # Every peer holds the global mean after MKD.
        summary = json.loads((tmp_path / "config.json").read_text())
        assert summary["mkd"] is True


def test_config_refuses_mkd_outside_marfl_and_bad_values():
    with pytest.raises(ConfigError, match="--mkd is not allowed with --algorithm=fedavg"):
        Config(mkd=True, algorithm="fedavg").validate()
    with pytest.raises(ConfigError, match="--mkd_teacher_fraction=0.0"):
        Config(mkd_teacher_fraction=0.0).validate()
    with pytest.raises(ConfigError, match="--mkd_iterations=0"):
        Config(mkd_iterations=0).validate()
    assert assemble.distillation(Config()) is None
    assert assemble.distillation(Config(mkd=True, mkd_no_blending=True)).blend is False

