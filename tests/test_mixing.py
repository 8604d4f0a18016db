"""Tests of group means over the peer axis."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from marfl_jax import assemble, mixing, rules


def _tree(num_peers, seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(num_peers, 3, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(num_peers,)), jnp.float32),
            "count": jnp.arange(num_peers, dtype=jnp.int32)}


class GroupMeanTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_loop_with_absent_peers(self):
        ids = jnp.array([0, 1, 0, -1, 2, 1, 0, -1], jnp.int32)
        tree = _tree(8)
        out = self.variant(lambda t, g: mixing.group_mean(t, g, 3))(tree, ids)
        w = np.asarray(tree["w"])
        expected = w.copy()
        for g in range(3):
            members = np.flatnonzero(np.asarray(ids) == g)
            expected[members] = w[members].mean(axis=0)
        chex.assert_trees_all_close(out["w"], expected, atol=1e-6)
        # Absent peers unchanged, integer leaves untouched.
        chex.assert_trees_all_equal(out["w"][3], tree["w"][3])
        chex.assert_trees_all_equal(out["count"], tree["count"])

    def test_group_of_one_keeps_its_value(self):
        tree = _tree(4)
        out = mixing.group_mean(tree, jnp.array([0, 1, 2, 3]), 4)
        chex.assert_trees_all_close(out, tree)

    def test_everyone_absent_is_identity(self):
        tree = _tree(5)
        out = mixing.group_mean(tree, jnp.full(5, -1, jnp.int32), 2)
        chex.assert_trees_all_equal(out, tree)

    def test_one_group_gives_global_mean(self):
        tree = _tree(6)
        out = mixing.group_mean(tree, jnp.zeros(6, jnp.int32), 1)
        chex.assert_trees_all_close(out["w"], jnp.broadcast_to(tree["w"].mean(0), (6, 3, 2)),
                                    atol=1e-6)


class SegmentScanTest(parameterized.TestCase):
    """The scatter-free group reductions against a per-group NumPy loop."""

    @parameterized.parameters((13, 4, 5), (32, 7, 32), (9, 1, 9), (16, 8, 2))
    def test_sum_and_max_match_numpy_with_absent_peers(self, num_peers, num_groups, bound):
        rng = np.random.default_rng(num_peers + num_groups)
        # Groups of at most `bound` members (absent: -1), in scrambled peer order.
        ids = np.full(num_peers, -1)
        slots = rng.permutation(num_peers)
        for g in range(num_groups):
            ids[slots[g * bound:(g + 1) * bound]] = g
        ids[rng.random(num_peers) < 0.2] = -1
        x = rng.normal(size=(num_peers, 3)).astype(np.float32)
        seg = mixing.segments(jnp.asarray(ids, jnp.int32), num_groups, bound)
        sums, maxima = jax.jit(lambda v: (mixing.segment_scan(v, seg),
                                          mixing.segment_scan(v, seg, jnp.maximum)))(x)
        for p in np.flatnonzero(ids >= 0):
            members = ids == ids[p]
            chex.assert_trees_all_close(sums[p], x[members].sum(0), atol=1e-5)
            chex.assert_trees_all_equal(maxima[p], x[members].max(0))
            assert int(seg.sizes[p]) == members.sum()
        assert (np.asarray(seg.sizes)[ids < 0] == 0).all()

    def test_a_bound_below_the_largest_group_gives_partial_sums(self):
        # Why the runner refuses a group above the algorithm's max_group_size: the scan's
        # length comes from the bound.
        ids = jnp.zeros(8, jnp.int32)
        seg = mixing.segments(ids, 1, 2)
        assert float(mixing.segment_scan(jnp.ones(8), seg)[0]) == 2.0

    def test_group_mean_with_a_bound_equals_the_unbounded_one(self):
        ids = jnp.array([0, 1, 0, -1, 2, 1, 0, 2, 3, -1], jnp.int32)
        tree = _tree(10)
        chex.assert_trees_all_close(mixing.group_mean(tree, ids, 4, max_group_size=3),
                                    mixing.group_mean(tree, ids, 4), atol=1e-6)


class RankTest(chex.TestCase, parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_rank_is_position_by_peer_id(self):
        ids = jnp.array([2, 0, 2, -1, 0, 2, 1], jnp.int32)
        rank = self.variant(lambda g: mixing.rank_in_group(g, 3))(ids)
        chex.assert_trees_all_equal(rank, jnp.array([0, 0, 1, 0, 1, 2, 0], jnp.int32))

    @parameterized.parameters(1, 7, 64)
    def test_rank_matches_reference(self, num_peers):
        rng = np.random.default_rng(num_peers)
        ids = rng.integers(-1, 5, size=num_peers).astype(np.int32)
        rank = np.asarray(mixing.rank_in_group(jnp.asarray(ids), 5))
        for p in range(num_peers):
            expected = 0 if ids[p] < 0 else int(np.sum(ids[:p] == ids[p]))
            self.assertEqual(rank[p], expected)

    def test_group_sizes(self):
        ids = jnp.array([1, 1, -1, 0, 1], jnp.int32)
        chex.assert_trees_all_equal(mixing.group_sizes(ids, 3), jnp.array([1, 3, 0], jnp.int32))
        chex.assert_trees_all_equal(mixing.member_group_sizes(ids, 3),
                                    jnp.array([3, 3, 0, 1, 3], jnp.int32))


class ConsensusDistanceTest(chex.TestCase):

    def test_zero_after_exact_average_and_matches_numpy(self):
        tree = _tree(6)
        floats = {"w": tree["w"], "b": tree["b"]}
        present = jnp.array([True, True, False, True, True, True])
        d = mixing.consensus_distance(floats, present)
        p = np.asarray(present)
        expected = sum(
            ((np.asarray(x)[p] - np.asarray(x)[p].mean(0)) ** 2).sum() for x in floats.values()
        ) / p.sum()
        np.testing.assert_allclose(d, expected, rtol=1e-5)
        averaged = mixing.group_mean(floats, jnp.where(present, 0, -1), 1)
        np.testing.assert_allclose(mixing.consensus_distance(averaged, present), 0.0, atol=1e-10)

    def test_jit(self):
        tree = {"w": jnp.ones((3, 2))}
        self.assertEqual(float(jax.jit(mixing.consensus_distance)(tree, jnp.ones(3, bool))), 0.0)


def test_blocked_mean_and_consensus_equal_the_whole_leaf_ones():
    rng = np.random.default_rng(7)
    tree = {"a": jnp.asarray(rng.normal(size=(12, 7, 5)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32),
            "n": jnp.arange(12)}
    ids = jnp.array([0, 0, 1, 1, -1, 2, 2, 2, 0, 1, 3, -1], jnp.int32)
    small = 12 * 4 * 4  # Four columns per block: blocks plus a remainder.
    chex.assert_trees_all_close(mixing.group_mean(tree, ids, 4, block_bytes=small),
                                mixing.group_mean(tree, ids, 4), atol=1e-6)
    present = ids >= 0
    np.testing.assert_allclose(mixing.consensus_distance(tree, present, block_bytes=small),
                               mixing.consensus_distance(tree, present), rtol=1e-6)


def test_consensus_of_identical_models_is_exactly_zero():
    """The mean of equal values is rounded (the old formula read ~1e-12 here); the distance of
    identical models must be 0, and absent peers must not count."""
    one = jax.random.normal(jax.random.key(0), (1, 3000)) * 7.3 + 0.1
    tree = {"w": jnp.broadcast_to(one, (6, 3000)), "b": jnp.full((6, 5), 1 / 3)}
    present = jnp.array([False, True, True, True, True, True])
    assert float(mixing.consensus_distance(tree, present)) == 0.0
    odd = {"w": tree["w"].at[0].add(1.0), "b": tree["b"]}  # Peer 0 differs but is absent.
    assert float(mixing.consensus_distance(odd, present)) == 0.0
    assert float(mixing.consensus_distance(odd, jnp.ones(6, bool))) == pytest.approx(
        3000 * 5 / 36, rel=1e-5)  # One of 6 peers off by 1 in 3000 columns.
    blocked = mixing.consensus_distance(odd, jnp.ones(6, bool), block_bytes=6 * 4 * 128)
    assert float(blocked) == pytest.approx(3000 * 5 / 36, rel=1e-5)


@pytest.mark.parametrize("changes, radices", [
    (dict(num_peers=64, group_size=4, key_dim=3), (4, 4, 4)),
    (dict(num_peers=100, key_dim=3, schedule="mixed_radix"), (4, 5, 5)),
    (dict(num_peers=8, group_size=2, key_dim=3, rounds=5), (2, 2, 2)),
    (dict(num_peers=12, algorithm="fedavg"), (12,)),
])
def test_grid_rounds_equal_the_segment_means_of_the_schedule(changes, radices):
    from marfl_jax import Config

    algorithm = assemble.algorithm(Config(**changes))
    n = math.prod(radices)
    schedule = algorithm.schedule(jnp.ones((algorithm.num_rounds, n), bool), jax.random.key(0))
    assert algorithm.grid is not None and algorithm.grid.radices == radices
    assert len(algorithm.grid.axes) == algorithm.num_rounds
    tree = _tree(n)
    on_grid = mixing.mixer(algorithm.num_groups, grid=algorithm.grid)
    chex.assert_trees_all_close(mixing.mix(tree, schedule, on_grid),
                                mixing.mix(tree, schedule, mixing.mixer(algorithm.num_groups)),
                                rtol=1e-5, atol=1e-6)


def test_schedules_that_are_no_grid_have_none():
    from marfl_jax import Config

    assert assemble.algorithm(Config(num_peers=100, key_dim=3)).grid is None  # Buckets.
    assert assemble.algorithm(Config(num_peers=16, algorithm="gossip")).grid is None
    wrong = np.stack([np.arange(8) % 2, np.arange(8) % 3])  # Not the groups of a grid axis.
    assert mixing.grid_of(wrong, (2, 2, 2)) is None


def test_full_participation_mixes_without_scatter():
    """The chain uses the grid only when every peer takes part, and then only where the step
    finds the schedule to be the grid: a `lax.cond` between the grid mean (no scatter) and the
    segment sums, in the aggregation and in observe's agreement shortcut. With dropout only the
    segment sums are compiled."""
    from marfl_jax import Config, core, models

    def hlo(config):
        sim = assemble.simulation(config, models.get_model("mlp", 10, hidden=(8,)))
        state = jax.eval_shape(lambda: core.init_state(
            models.get_model("mlp", 10, hidden=(8,)), sim.optimizer, jnp.zeros((1, 784)),
            config.num_peers, jax.random.key(0), sim.churn_model))
        data = core.DeviceData(jnp.zeros((64, 28, 28), jnp.uint8), jnp.zeros(64, jnp.int32),
                               jnp.zeros((config.num_peers, 8), jnp.int32),
                               jnp.full((config.num_peers,), 8, jnp.int32))
        iteration = jax.jit(core.make_iteration(sim))
        return iteration.lower(state, jax.random.key(1), data).as_text()

    config = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=1,
                    batch_size=4)
    assert hlo(config).count("stablehlo.case") == 2
    assert "stablehlo.case" not in hlo(Config(**{**config.__dict__, "dropout": 0.2}))
    grid = assemble.simulation(config, models.get_model("mlp", 10, hidden=(8,))
                                  ).algorithm.grid
    tree = _tree(8)
    grid_branch = jax.jit(lambda t: mixing.grid_mean(t, grid.radices, (0, 1, 2))).lower(tree)
    assert "scatter" not in grid_branch.as_text()


@pytest.mark.parametrize("shape", [(7,), (64, 3, 5), (5, 1000)])
def test_peer_sum_adds_the_peers_in_full_float32(shape):
    x = jax.random.normal(jax.random.key(0), shape) * 1e3
    weights = (jnp.arange(shape[0]) % 3 == 0).astype(jnp.float32)
    chex.assert_trees_all_close(mixing.peer_sum(x), np.asarray(x, np.float64).sum(0),
                                rtol=1e-5, atol=1e-2)
    chex.assert_trees_all_close(mixing.peer_sum(x, weights),
                                (np.asarray(x, np.float64) * np.asarray(weights)[
                                    (slice(None),) + (None,) * (len(shape) - 1)]).sum(0),
                                rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 1), (1, 2), (0, 2), (0, 1, 2)])
def test_grid_mean_on_any_axes_equals_the_reduction(axes):
    x = {"w": jax.random.normal(jax.random.key(1), (60, 3, 2)),
         "step": jnp.arange(60, dtype=jnp.int32)}
    radices = (3, 4, 5)
    shape = tuple(reversed(radices))
    positions = tuple(len(radices) - 1 - a for a in axes)
    grid = np.asarray(x["w"], np.float64).reshape(shape + (3, 2))
    expected = np.broadcast_to(grid.mean(axis=positions, keepdims=True), grid.shape)
    mixed = mixing.grid_mean(x, radices, axes)
    chex.assert_trees_all_close(mixed["w"], expected.reshape(60, 3, 2), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(mixed["step"], x["step"])


def _churned_schedules():
    """(name, schedule (G, N), num_groups, max_group_size): several schedules under churn."""
    n = 12
    rng = np.random.default_rng(5)
    peers = np.arange(n)
    grid = np.stack([peers // 4, peers % 4])  # 3 x 4 grid rounds.
    pairs = np.stack([rng.permutation(n) // 2 for _ in range(3)])  # Gossip-like pairs.
    one = np.zeros((1, n), np.int64)  # One group of everyone.
    schedules = []
    for name, ids, groups in (("grid", grid, 4), ("pairs", pairs, n // 2), ("one", one, 1)):
        absent = rng.random(ids.shape) < 0.3
        absent[:, 0] = True  # Someone is always out.
        schedules.append((name, np.where(absent, -1, ids).astype(np.int32), groups))
    return schedules


class GroupRuleTest(chex.TestCase, parameterized.TestCase):

    @chex.variants(with_jit=True)  # Jitted, as the step runs it.
    def test_the_mean_through_the_slots_is_the_segment_mean(self):
        from marfl_jax import rules

        tree = _tree(12, seed=3)
        # Not exact_mean: forces the generic path.
        slots_mean = rules.Rule(rules.coordinatewise(rules.mean))
        for name, schedule, groups in _churned_schedules():
            segment = self.variant(lambda t, s, g=groups: mixing.mix(t, s, mixing.mixer(g)))(
                tree, schedule)
            generic = self.variant(lambda t, s, g=groups: mixing.mix(
                t, s, mixing.mixer(g, slots_mean, max_group_size=12)))(tree, schedule)
            chex.assert_trees_all_close(generic, segment, atol=1e-6, rtol=1e-6,
                                        custom_message=name)
            chex.assert_trees_all_equal(generic["count"], tree["count"])

    def test_median_is_numpys_per_group_and_absent_peers_keep_theirs(self):
        tree = _tree(12, seed=4)
        for name, schedule, groups in _churned_schedules():
            out = jax.jit(lambda t, s, g=groups: mixing.mix(t, s, mixing.mixer(
                g, rules.get("median"), max_group_size=12)))(tree, schedule)
            w = np.asarray(tree["w"])
            for ids in schedule:
                expected = w.copy()
                for g in range(groups):
                    members = np.flatnonzero(ids == g)
                    if members.size:
                        expected[members] = np.median(w[members], axis=0)
                w = expected
            np.testing.assert_allclose(np.asarray(out["w"]), w, atol=1e-6, err_msg=name)

    def test_a_rule_sees_slots_by_rank_and_only_present_members(self):
        seen = []

        def spy(received, present):
            seen.append((np.asarray(received), np.asarray(present)))
            return received[:, 0]  # Every member takes its group's lowest peer's copy.

        from marfl_jax import rules

        x = jnp.arange(6, dtype=jnp.float32)[:, None] * 10
        out = mixing.mix(x, jnp.array([[1, 0, 1, -1, 0, 1]], jnp.int32), mixing.mixer(
            2, rules.Rule(rules.coordinatewise(spy)), max_group_size=3))
        received, present = seen[0]
        np.testing.assert_array_equal(present, [[True, True, False], [True, True, True]])
        np.testing.assert_array_equal(received[..., 0], [[10, 40, 0], [0, 20, 50]])
        np.testing.assert_array_equal(np.asarray(out)[:, 0], [0, 10, 0, 30, 10, 0])

    def test_the_grid_is_taken_only_where_the_schedule_is_the_grid(self):
        grid = mixing.Grid((3, 4), (0, 1))
        ids = jnp.asarray(mixing.grid_group_ids(grid))
        assert bool(mixing.on_grid(ids, grid, 12))
        assert bool(mixing.on_grid(ids * 2 + 1, grid, 32))  # Relabelled: the same groups.
        assert not bool(mixing.on_grid(ids.at[1, 5].set(-1), grid, 12))  # Someone absent.
        assert not bool(mixing.on_grid(ids[::-1], grid, 12))  # Rounds in another order.
        tree = _tree(12, seed=6)
        absent = ids.at[:, 7].set(-1)
        segment = mixing.mix(tree, absent, mixing.mixer(12))
        checked = jax.jit(lambda t, s: mixing.mix(t, s, mixing.mixer(12, grid=grid)))(tree, absent)
        chex.assert_trees_all_close(checked, segment, atol=1e-6)
        chex.assert_trees_all_equal(checked["w"][7], tree["w"][7])
        on_grid = jax.jit(lambda t, s: mixing.mix(t, s, mixing.mixer(12, grid=grid)))
        chex.assert_trees_all_equal(on_grid(tree, ids),
                                    mixing.grid_mean(tree, (3, 4), (0, 1)))

    def test_a_lossy_round_trip_takes_only_the_mean(self):
        with pytest.raises(ValueError, match="exact-mean"):
            from marfl_jax import rules

            mixing.mixer(1, rules.get("median"), roundtrip=lambda t: t)
