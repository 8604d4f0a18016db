"""Tests of MAR-FL's Moshpit group-key schedule."""

import math
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from marfl_jax import mixing
from marfl_jax.algorithms import marfl


def _random_tree(num_peers, seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(num_peers, 5)), jnp.float32),
            "m": jnp.asarray(rng.normal(size=(num_peers, 2, 3)), jnp.float32)}


def _disagreement(tree):
    """Mean squared deviation of peers from the global mean."""
    return sum(float(((x - x.mean(0)) ** 2).mean()) for x in jax.tree.leaves(tree))


class GridScheduleTest(chex.TestCase, parameterized.TestCase):

    @parameterized.parameters((4, 2), (4, 3), (2, 5), (5, 3), (3, 3), (8, 2), (7, 1))
    def test_full_grid_gives_exact_global_mean(self, group_size, key_dim):
        num_peers = group_size**key_dim
        rule = marfl.authors_key_rule(num_peers, group_size, key_dim)
        self.assertEqual(rule.exact_rounds, key_dim)
        schedule = marfl.moshpit_schedule(jnp.ones((key_dim, num_peers), bool), rule)
        tree = _random_tree(num_peers)
        mixed = mixing.mix(tree, schedule, mixing.mixer(rule.num_groups))
        expected = jax.tree.map(lambda x: jnp.broadcast_to(x.mean(0), x.shape), tree)
        chex.assert_trees_all_close(mixed, expected, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_grid_rounds_are_groups_of_m_along_each_axis(self):
        rule = marfl.authors_key_rule(16, 4, 2)
        schedule = self.variant(lambda p: marfl.moshpit_schedule(p, rule))(jnp.ones((2, 16), bool))
        ids = np.asarray(schedule)
        # Round 0: consecutive peers (same leading digit); round 1: same last digit.
        np.testing.assert_array_equal(ids[0], np.arange(16) // 4)
        np.testing.assert_array_equal(ids[1], np.arange(16) % 4)

    def test_absent_peers_are_excluded_and_keep_their_value(self):
        rule = marfl.authors_key_rule(27, 3, 3)
        present = jnp.asarray(np.arange(27) % 5 != 0)
        schedule = marfl.moshpit_schedule(jnp.broadcast_to(present, (3,) + present.shape), rule)
        self.assertTrue(bool(jnp.all(schedule[:, ~present] == -1)))
        tree = _random_tree(27)
        mixed = mixing.mix(tree, schedule, mixing.mixer(rule.num_groups))
        chex.assert_trees_all_equal(mixed["w"][~present], tree["w"][~present])


class BucketScheduleTest(chex.TestCase):

    def test_residual_at_100_peers_is_a_few_percent(self):
        # The authors report 3.4e-2 of the initial disagreement (N=100, M=4, 3 rounds).
        rule = marfl.authors_key_rule(100, 4, 3)
        self.assertIsNone(rule.exact_rounds)
        self.assertEqual(rule.num_groups, 25)
        schedule = marfl.moshpit_schedule(jnp.ones((3, 100), bool), rule)
        ratios = []
        for seed in range(5):
            tree = _random_tree(100, seed)
            ratios.append(_disagreement(mixing.mix(tree, schedule, mixing.mixer(25)))
                          / _disagreement(tree))
        self.assertBetween(float(np.mean(ratios)), 0.01, 0.08)

    def test_125_peers_uses_hard_coded_alphas(self):
        rule = marfl.authors_key_rule(125, 4, 3)
        schedule = np.asarray(marfl.moshpit_schedule(jnp.ones((3, 125), bool), rule))
        np.testing.assert_array_equal(schedule[0], np.arange(125) // 4)
        rank = np.arange(125) % 4  # Round 0 groups are consecutive peers.
        np.testing.assert_array_equal(schedule[1], (np.arange(125) // 4 + 1 * rank) % 32)
        # Mixing always preserves the global mean.
        tree = _random_tree(125)
        mixed = mixing.mix(tree, jnp.asarray(schedule), mixing.mixer(rule.num_groups))
        chex.assert_trees_all_close(jax.tree.map(lambda x: x.mean(0), mixed),
                                    jax.tree.map(lambda x: x.mean(0), tree), atol=1e-5)

    def test_single_peer(self):
        rule = marfl.authors_key_rule(1, 4, 3)
        schedule = marfl.moshpit_schedule(jnp.ones((3, 1), bool), rule)
        tree = _random_tree(1)
        chex.assert_trees_all_close(mixing.mix(tree, schedule, mixing.mixer(rule.num_groups)), tree)


class MixedRadixTest(chex.TestCase, parameterized.TestCase):

    @parameterized.parameters((100, 3, (4, 5, 5)), (96, 3, (4, 4, 6)), (64, 3, (4, 4, 4)),
                              (97, 3, (97,)), (1000, 3, (10, 10, 10)), (12, 2, (3, 4)))
    def test_factors(self, num_peers, num_rounds, expected):
        self.assertEqual(marfl.mixed_radix_factors(num_peers, num_rounds), expected)

    @parameterized.parameters((100, 3), (96, 3), (60, 3), (125, 3), (30, 2), (7, 2), (1, 3))
    def test_exact_global_mean_for_any_factorable_n(self, num_peers, num_rounds):
        radices = marfl.mixed_radix_factors(num_peers, num_rounds)
        rule = marfl.mixed_radix_key_rule(num_peers, radices)
        schedule = marfl.moshpit_schedule(jnp.ones((rule.exact_rounds, num_peers), bool), rule)
        tree = _random_tree(num_peers, seed=num_peers)
        mixed = mixing.mix(tree, schedule, mixing.mixer(rule.num_groups))
        expected = jax.tree.map(lambda x: jnp.broadcast_to(x.mean(0), x.shape), tree)
        chex.assert_trees_all_close(mixed, expected, atol=1e-5)
        # Each round's groups have exactly the radix's size.
        for r, radix in enumerate(radices):
            sizes = np.bincount(np.asarray(schedule[r]))
            self.assertEqual(set(sizes[sizes > 0]), {radix})

    def test_churn_keeps_absent_peers_and_the_present_mean_on_average(self):
        rule = marfl.mixed_radix_key_rule(100, (4, 5, 5))
        present = jnp.asarray(np.arange(100) % 7 != 3)
        schedule = marfl.moshpit_schedule(jnp.broadcast_to(present, (3,) + present.shape), rule)
        tree = _random_tree(100)
        mixed = mixing.mix(tree, schedule, mixing.mixer(rule.num_groups))
        chex.assert_trees_all_equal(mixed["w"][~present], tree["w"][~present])
        self.assertLess(_disagreement(jax.tree.map(lambda x: x[present], mixed)),
                        0.05 * _disagreement(jax.tree.map(lambda x: x[present], tree)))



class FullScheduleTest(parameterized.TestCase):
    """The NumPy schedule at full participation (what the factories and validate() use) is
    moshpit_schedule's, round by round."""

    @parameterized.parameters(
        ("authors", 64, 4, 3, 3), ("authors", 64, 4, 3, 5), ("authors", 50, 4, 3, 3),
        ("authors", 125, 4, 3, 3), ("authors", 125, 3, 4, 4), ("authors", 100, 4, 3, 3),
        ("authors", 7, 4, 3, 3), ("authors", 1, 4, 3, 1), ("mixed_radix", 100, 4, 3, 3),
        ("mixed_radix", 96, 4, 3, 4), ("mixed_radix", 97, 4, 3, 3))
    def test_equals_moshpit_schedule(self, schedule, num_peers, group_size, key_dim, rounds):
        if schedule == "mixed_radix":
            rule = marfl.mixed_radix_key_rule(
                num_peers, marfl.mixed_radix_factors(num_peers, key_dim))
        else:
            rule = marfl.authors_key_rule(num_peers, group_size, key_dim)
        expected = np.asarray(marfl.moshpit_schedule(jnp.ones((rounds, num_peers), bool), rule))
        full = marfl.full_schedule(rule, rounds)
        self.assertEqual(full.dtype, np.int32)
        np.testing.assert_array_equal(full, expected)

    def test_random_cells_share_the_jax_schedule(self):
        rule = marfl.grid_key_rule((4, 5), np.random.default_rng(0).integers(0, 20, 30))
        expected = np.asarray(marfl.moshpit_schedule(jnp.ones((4, 30), bool), rule))
        np.testing.assert_array_equal(marfl.full_schedule(rule, 4), expected)


# ---- A plain-Python oracle of the authors' group formation (felix-fjm/mar-fl) ----
# Written from the semantics of their moshpit_all_reduce.py (get_initial_index, update_group_key,
# matchmake_group, communicate_models' chunk index) and peer_aggregation_logic.py
# (run_peer_aggregation_logic): every outer iteration each aggregating peer starts from its
# initial key (a list: grid digits, or [bucket(, 0...), phase]); in each MAR round the peers
# whose key lists are equal form a group, a member's chunk index is its position in the sorted
# member list, and every member then updates its key with that index. A peer that is not drawn to
# aggregate (or drops out) gets a "skip" task for the whole iteration: it stores no matchmaking
# entry, so it is in no group of any round and counts in no chunk index.

def _oracle_alpha_schedule(num_peers, group_size, key_dim, phase):
    if (group_size, key_dim, num_peers) == (4, 3, 125):
        return [1, 5]
    if (group_size, key_dim, num_peers) == (3, 4, 125):
        return [1, 5, 11]
    num_buckets = -(-num_peers // group_size)
    alpha = 2 * phase + 1
    while math.gcd(alpha, num_buckets) != 1:
        alpha += 2
    return [alpha]


def _oracle_pack(bucket, phase, dims):
    if dims == 1:
        return (bucket,)
    if dims == 2:
        return (bucket, phase)
    return (bucket,) + (0,) * max(dims - 2, 0) + (phase,)


def _oracle_initial_key(peer, group_size, key_dim, num_peers):
    if num_peers == group_size**key_dim:
        return tuple((peer // group_size ** (key_dim - j)) % group_size for j in range(1, key_dim))
    return _oracle_pack(peer // group_size, 0, key_dim - 1)


def _oracle_next_key(key, chunk, group_size, key_dim, num_peers, alpha_schedule):
    if num_peers == group_size**key_dim:
        return key[1:] + (chunk,)
    dims = key_dim - 1
    bucket, phase = key[0], (key[-1] if dims >= 2 else 0)
    schedule = alpha_schedule(num_peers, group_size, key_dim, phase)
    alpha = schedule[phase % len(schedule)]
    num_buckets = -(-num_peers // group_size)
    return _oracle_pack((bucket + alpha * chunk) % num_buckets, (phase + 1) % len(schedule), dims)


def _oracle_groups(num_peers, group_size, key_dim, num_rounds, present=None,
                   alpha_schedule=_oracle_alpha_schedule):
    """One iteration's groups: per round, the set of frozensets of member peer ids."""
    peers = [p for p in range(num_peers) if present is None or present[p]]
    keys = {p: _oracle_initial_key(p, group_size, key_dim, num_peers) for p in peers}
    rounds = []
    for _ in range(num_rounds):
        members: dict[tuple, list[int]] = {}
        for p in peers:  # Each peer finds the peers that stored the same key string.
            members.setdefault(keys[p], []).append(p)
        rounds.append({frozenset(group) for group in members.values()})
        for group in members.values():
            ordered = sorted(group)
            for p in group:
                keys[p] = _oracle_next_key(keys[p], ordered.index(p), group_size, key_dim,
                                           num_peers, alpha_schedule)
    return rounds


def _project_groups(schedule):
    """(G, N) group ids (-1 absent) -> per round, the set of frozensets of member peer ids."""
    rounds = []
    for ids in np.asarray(schedule):
        members: dict[int, list[int]] = {}
        for p, g in enumerate(ids.tolist()):
            if g >= 0:
                members.setdefault(g, []).append(p)
        rounds.append({frozenset(group) for group in members.values()})
    return rounds


def _project_schedule(num_peers, group_size, key_dim, num_rounds, present=None):
    rule = marfl.authors_key_rule(num_peers, group_size, key_dim)
    mask = np.ones(num_peers, bool) if present is None else np.asarray(present, bool)
    return marfl.moshpit_schedule(jnp.asarray(np.broadcast_to(mask, (num_rounds, num_peers))),
                                  rule)


_ORACLE_SETTINGS = ((125, 4, 3), (125, 3, 4), (100, 4, 3), (64, 4, 3))


class AuthorsOracleTest(parameterized.TestCase):
    """The project's authors_key_rule + moshpit_schedule against the oracle above."""

    def _assert_same_groups(self, num_peers, group_size, key_dim, num_rounds, present=None):
        expected = _oracle_groups(num_peers, group_size, key_dim, num_rounds, present)
        actual = _project_groups(
            _project_schedule(num_peers, group_size, key_dim, num_rounds, present))
        self.assertLen(actual, num_rounds)
        for r in range(num_rounds):
            self.assertEqual(actual[r], expected[r], f"round {r} of (N, M, d) = "
                             f"{(num_peers, group_size, key_dim)}")

    @parameterized.parameters(*_ORACLE_SETTINGS)
    def test_full_participation_matches_the_authors_groups(self, num_peers, group_size, key_dim):
        # The authors' default number of MAR rounds is d (--ni = --gk = 3); 2d more rounds also
        # cycle the hard-coded alpha schedules past their end.
        self._assert_same_groups(num_peers, group_size, key_dim, key_dim)
        self._assert_same_groups(num_peers, group_size, key_dim, 2 * key_dim + 1)

    @parameterized.parameters(*_ORACLE_SETTINGS)
    def test_partial_participation_matches_the_authors_groups(self, num_peers, group_size,
                                                              key_dim):
        # Absent peers skip the whole iteration (the same mask in every round), as the authors'
        # dispatcher draws them; present peers' chunk indices count only present members.
        for seed, fraction in ((0, 0.7), (1, 0.29), (2, 0.95)):
            rng = np.random.default_rng(seed)
            present = np.zeros(num_peers, bool)
            present[rng.choice(num_peers, int(round(fraction * num_peers)), replace=False)] = True
            self._assert_same_groups(num_peers, group_size, key_dim, key_dim, present)

    def test_oracle_round_two_at_125_peers_depends_on_alpha_five(self):
        # The oracle itself: with alpha = 3 instead of 5 in the second key update only round 2's
        # groups change, so round 2 is where the hard-coded alphas are pinned.
        def wrong(num_peers, group_size, key_dim, phase):
            return [1, 3]

        right = _oracle_groups(125, 4, 3, 3)
        wrong_groups = _oracle_groups(125, 4, 3, 3, alpha_schedule=wrong)
        self.assertEqual(right[:2], wrong_groups[:2])
        self.assertNotEqual(right[2], wrong_groups[2])
        # Round 0: consecutive blocks of 4 (the last bucket holds peer 124 alone).
        self.assertEqual(right[0], {frozenset(range(4 * b, min(4 * b + 4, 125)))
                                    for b in range(32)})

    @parameterized.parameters(((125, 4, 3), (1, 3), 2), ((125, 3, 4), (1, 5, 7), 3),
                              ((125, 3, 4), (1, 7, 11), 2), ((100, 4, 3), (3,), 1))
    def test_catches_a_wrong_alpha(self, setting, wrong_alphas, first_wrong_round):
        num_peers, group_size, key_dim = setting
        expected = _oracle_groups(num_peers, group_size, key_dim, key_dim)
        with mock.patch.object(marfl, "_authors_alphas", lambda *_: wrong_alphas):
            actual = _project_groups(_project_schedule(num_peers, group_size, key_dim, key_dim))
        self.assertEqual(actual[:first_wrong_round], expected[:first_wrong_round])
        self.assertNotEqual(actual[first_wrong_round], expected[first_wrong_round])

    def test_catches_a_wrong_grid_shift(self):
        # A grid rule that shifts the key right (c becomes the leading digit) instead of left.
        num_peers, group_size, key_dim = 64, 4, 3
        good = marfl.authors_key_rule(num_peers, group_size, key_dim)
        bad = good._replace(next_key=lambda keys, chunk, _r: keys // group_size + chunk * 4)
        schedule = marfl.moshpit_schedule(jnp.ones((key_dim, num_peers), bool), bad)
        actual = _project_groups(schedule)
        expected = _oracle_groups(num_peers, group_size, key_dim, key_dim)
        self.assertEqual(actual[0], expected[0])
        self.assertNotEqual(actual[1], expected[1])
