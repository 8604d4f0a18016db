"""Group rules over the whole message (marfl_jax/rules.py) against plain per-group NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from marfl_jax import assemble, mixing, rules

SHAPES = ((3, 2), (4,), ())  # Three leaves of different shapes per member.
# (groups, slots, f): including groups of n <= 2f present copies.
CASES = ((4, 4, 1), (5, 5, 2), (3, 3, 1), (2, 6, 0), (6, 4, 3))


def _slots(groups, slots, seed):
    rng = np.random.default_rng(seed)
    tree = {f"l{i}": rng.normal(size=(groups, slots) + shape).astype(np.float32)
            for i, shape in enumerate(SHAPES)}
    present = rng.random((groups, slots)) < 0.7
    present[0] = False  # Nobody.
    present[1] = np.arange(slots) == 1  # One member, not in slot 0.
    for name in tree:  # Empty slots hold zeros, as combine_groups fills them.
        tree[name] = np.where(present.reshape(present.shape + (1,) * (tree[name].ndim - 2)),
                              tree[name], 0).astype(np.float32)
    return tree, present


def _reference(rule, tree, present, params):
    """The rule written plainly: a loop over groups, float64."""
    out = {name: np.zeros(x.shape[:1] + x.shape[2:]) for name, x in tree.items()}
    for g in range(present.shape[0]):
        members = np.flatnonzero(present[g])
        n = members.size
        if n == 0:
            continue
        copies = {name: x[g, members].astype(np.float64) for name, x in tree.items()}
        f = min(params.f, (n - 1) // 2)
        if rule == "mean":
            value = {name: c.mean(0) for name, c in copies.items()}
        elif rule == "median":
            value = {name: np.median(c, 0) for name, c in copies.items()}
        elif rule == "trimmed_mean":
            value = {name: np.sort(c, 0)[f:n - f].mean(0) for name, c in copies.items()}
        elif rule == "krum":
            flat = np.concatenate([c.reshape(n, -1) for c in copies.values()], axis=1)
            scores = []
            for i in range(n):
                others = [np.sum((flat[i] - flat[j]) ** 2) for j in range(n) if j != i]
                scores.append(sum(sorted(others)[:n - f - 1]))
            best = int(np.argmin(scores))
            value = {name: c[best] for name, c in copies.items()}
        elif rule == "centered_clip":
            value = {name: np.median(c, 0) for name, c in copies.items()}
            for _ in range(params.iterations):
                diffs = {name: c - value[name] for name, c in copies.items()}
                norms = np.sqrt(sum((d.reshape(n, -1) ** 2).sum(1) for d in diffs.values()))
                scale = np.minimum(1.0, params.tau / np.maximum(norms, 1e-30))
                value = {name: value[name] + (d * scale.reshape((n,) + (1,) * (d.ndim - 1))
                                              ).mean(0) for name, d in diffs.items()}
        for name in out:
            out[name][g] = value[name]
    return out


class RuleTest(chex.TestCase, parameterized.TestCase):

    @chex.variants(with_jit=True)  # Jitted, as the step runs them.
    @parameterized.parameters("mean", "median", "trimmed_mean", "krum", "centered_clip")
    def test_every_rule_is_its_per_group_definition(self, name):
        for case, (groups, slots, f) in enumerate(CASES):
            for tau, iterations in ((0.5, 1), (3.0, 3), (100.0, 2)):
                params = rules.Params(f=f, tau=tau, iterations=iterations)
                rule = rules.get(name, params)
                tree, present = _slots(groups, slots, seed=case)
                got = self.variant(lambda t, p, rule=rule: rule.combine(t, p, rule.params))(
                    jax.tree.map(jnp.asarray, tree), jnp.asarray(present))
                want = _reference(name, tree, present, params)
                for leaf in tree:
                    np.testing.assert_allclose(np.asarray(got[leaf]), want[leaf], atol=2e-5,
                                               rtol=2e-5, err_msg=f"{name} {case} {leaf} {tau}")

    def test_f_is_capped_per_group_so_a_huge_f_trims_to_the_median(self):
        tree, present = _slots(5, 5, seed=7)
        trimmed = rules.get("trimmed_mean", rules.Params(f=99)).combine(
            tree, jnp.asarray(present), rules.Params(f=99))
        chex.assert_trees_all_close(trimmed, rules.coordinatewise(rules.median)(
            tree, jnp.asarray(present)), atol=1e-6)
        assert rules.tolerated(3, jnp.asarray(present)).tolist() == [
            min(3, max(n - 1, 0) // 2) for n in present.sum(1)]

    def test_krum_of_two_takes_the_lower_rank_and_of_one_the_only_copy(self):
        x = {"w": jnp.array([[[1.0], [5.0]], [[0.0], [7.0]]])}
        present = jnp.array([[True, True], [False, True]])
        out = rules.krum(x, present, rules.Params(f=3))
        np.testing.assert_array_equal(np.asarray(out["w"])[:, 0], [1.0, 7.0])

    def test_krum_uses_whole_copy_distances_not_per_leaf(self):
        # Per leaf, copy 2 is nearest on "a" and copy 0 on "b"; over the whole copy copy 1 wins.
        x = {"a": jnp.array([[[0.0], [1.0], [1.1], [10.0]]]),
             "b": jnp.array([[[5.0], [5.0], [9.0], [5.0]]])}
        out = rules.krum(x, jnp.ones((1, 4), bool), rules.Params(f=1))
        assert float(out["a"][0, 0]) == 1.0 and float(out["b"][0, 0]) == 5.0


class CombineGroupsTest(chex.TestCase):

    def test_the_rule_is_called_once_per_round_on_the_whole_message(self):
        calls = []

        def spy(received, present, params):
            calls.append(jax.tree.map(lambda x: x.shape, received))
            return jax.tree.map(lambda x: x[:, 0], received)

        tree = {"w": jnp.ones((6, 3, 2)), "b": jnp.ones(6), "count": jnp.arange(6)}
        schedule = jnp.array([[0, 0, 1, 1, -1, 1], [0, 1, 0, 1, 0, 1]], jnp.int32)
        out = mixing.mix(tree, schedule, mixing.mixer(2, rules.Rule(spy), max_group_size=3))
        assert calls == [{"w": (2, 3, 3, 2), "b": (2, 3), "count": None}] * 2
        chex.assert_trees_all_equal(out["count"], tree["count"])

    def test_robust_rules_through_mix_match_the_reference_and_absent_peers_keep_theirs(self):
        rng = np.random.default_rng(3)
        tree = {"w": jnp.asarray(rng.normal(size=(10, 3)), jnp.float32),
                "b": jnp.asarray(rng.normal(size=(10,)), jnp.float32)}
        ids = np.array([0, 1, 0, 2, -1, 1, 0, 2, 0, 1], np.int32)
        params = rules.Params(f=1, tau=0.7, iterations=2)
        for name in ("trimmed_mean", "krum", "centered_clip"):
            out = jax.jit(lambda t, s, n=name: mixing.mix(
                t, s, mixing.mixer(3, rules.get(n, params), max_group_size=4)))(tree, ids[None])
            for g in range(3):
                members = np.flatnonzero(ids == g)
                slots = {k: np.asarray(v)[members][None] for k, v in tree.items()}
                want = _reference(name, slots, np.ones((1, members.size), bool), params)
                for k in tree:
                    np.testing.assert_allclose(np.asarray(out[k])[members],
                                               np.broadcast_to(want[k][0], (members.size,)
                                                               + want[k].shape[1:]),
                                               atol=2e-5, err_msg=f"{name} {g} {k}")
            chex.assert_trees_all_equal(jax.tree.map(lambda x: x[4], out),
                                        jax.tree.map(lambda x: x[4], tree))

    def test_only_the_mean_takes_the_fast_paths(self):
        assert rules.RULES.get("mean").exact_mean
        assert not any(rules.RULES.get(n).exact_mean
                       for n in ("median", "trimmed_mean", "krum", "centered_clip"))
        tree = {"w": jnp.arange(8.0)[:, None], "count": jnp.arange(8)}
        ids = jnp.array([[0, 0, 1, 1, -1, 2, 2, 3]], jnp.int32)
        original = mixing.combine_groups
        mixing.combine_groups = None  # The mean must never reach the slots.
        try:
            out = mixing.mix(tree, ids, mixing.mixer(4, rules.MEAN))
        finally:
            mixing.combine_groups = original
        chex.assert_trees_all_equal(out, mixing.group_mean(tree, ids[0], 4))


@pytest.mark.parametrize("name", ["trimmed_mean", "krum", "centered_clip"])
def test_params_come_from_the_config(name):
    from marfl_jax.config import Config

    config = Config(aggregator=name, aggregator_f=2, clip_tau=0.5, clip_iterations=3,
                    group_size=8, key_dim=2).validate()
    rule = rules.get(config.aggregator, assemble.rule_params(config))
    assert rule.params == rules.Params(f=2, tau=0.5, iterations=3)
    assert rule.combine is rules.RULES.get(name).combine


def test_self_centered_clip_is_clipped_gossip_for_each_member():
    """Each member i takes x_i + (1/n) sum_j clip(x_j - x_i, tau) (whole-copy norms), written
    plainly per member in float64; absent peers keep theirs; with a radius no difference reaches
    every member takes the group mean."""
    rng = np.random.default_rng(5)
    tree = {"w": jnp.asarray(rng.normal(size=(10, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(10,)), jnp.float32)}
    ids = np.array([0, 1, 0, 2, -1, 1, 0, 2, 0, 1], np.int32)
    for tau in (0.7, 1e6):
        rule = rules.get("self_centered_clip", rules.Params(tau=tau))
        assert rule.per_member and not rule.exact_mean
        out = jax.jit(lambda t, r=rule: mixing.mix(
            t, ids[None], mixing.mixer(3, r, max_group_size=4)))(tree)
        flat = np.concatenate([np.asarray(tree["w"], np.float64),
                               np.asarray(tree["b"], np.float64)[:, None]], axis=1)
        got = np.concatenate([np.asarray(out["w"]), np.asarray(out["b"])[:, None]], axis=1)
        for g in range(3):
            members = np.flatnonzero(ids == g)
            for i in members:
                total = np.zeros(flat.shape[1])
                for j in members:
                    d = flat[j] - flat[i]
                    norm = np.linalg.norm(d)
                    total += d * min(1.0, tau / max(norm, 1e-30))
                np.testing.assert_allclose(got[i], flat[i] + total / members.size, atol=2e-5,
                                           err_msg=f"tau {tau} peer {i}")
                if tau == 1e6:
                    np.testing.assert_allclose(got[i], flat[members].mean(0), atol=2e-5)
        np.testing.assert_array_equal(got[4], flat[4].astype(np.float32))
        assert not np.allclose(got[0], got[2]) or tau == 1e6  # Members end apart.


def test_centered_clip_previous_starts_each_member_from_its_last_output():
    """Two rounds threading the rule's per-peer state: each member clips around what it took in
    its previous round (its own initial copy at first), written plainly in float64; an absent
    peer keeps its copy and its state."""
    rng = np.random.default_rng(6)
    tree = {"w": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}
    schedule = np.array([[0, 0, 1, 1, 2, 2, -1, 3], [0, 1, 0, 1, 2, 3, -1, 2]], np.int32)
    params = rules.Params(tau=0.8, iterations=2)
    rule = rules.get("centered_clip_previous", params)
    state = rule.init(tree)
    out, new_state = jax.jit(lambda t, s: mixing.mix_with_state(
        t, s, schedule, mixing.mixer(4, rule, max_group_size=2)))(tree, state)
    x = np.asarray(tree["w"], np.float64)
    previous = x.copy()
    for ids in schedule:
        start = previous.copy()
        for g in range(4):
            members = np.flatnonzero(ids == g)
            for i in members:
                v = start[i].copy()
                for _ in range(params.iterations):
                    steps = [(x[j] - v) * min(1.0, params.tau / max(np.linalg.norm(x[j] - v),
                                                                     1e-30)) for j in members]
                    v = v + np.mean(steps, axis=0)
                previous[i] = v
        x = np.where((ids >= 0)[:, None], previous, x)
    np.testing.assert_allclose(np.asarray(out["w"]), x, atol=2e-5)
    np.testing.assert_allclose(np.asarray(new_state["w"]), previous, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(new_state["w"])[6], np.asarray(tree["w"])[6])


def test_a_rule_with_state_runs_in_the_chain_and_keeps_it_in_the_run_state():
    from marfl_jax.config import Config
    from tests.simulate import simulate

    config = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=1,
                    batch_size=8, aggregator="centered_clip_previous", clip_tau=1.0,
                    max_iterations=2).validate()
    rows, state = simulate(config)
    remembered = state.stages["aggregator"]
    # Everyone took part: each member's state is what it took, its params after the rounds.
    chex.assert_trees_all_close(remembered[0], state.params)
    chex.assert_trees_all_close(jax.tree.leaves(remembered[1]), [
        x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)])
    assert rows[-1]["consensus_after"] > 0  # Members end apart (per-member results).


@pytest.mark.parametrize("fraction, group_size, f", [
    (0.0, 4, 1), (0.0, 8, 1), (0.0, 2, 0), (0.0, 3, 1),  # No attackers: still 1 (M > 2).
    (0.1, 4, 1), (0.3, 8, 3), (0.2, 4, 1), (0.49, 4, 1),  # Capped at (M - 1) // 2.
    (0.1, 2, 0), (0.4, 2, 0), (0.3, 1, 0),  # Pairs (gossip) and one copy: no f.
    (0.1, 64, 7), (0.2, 64, 13), (0.3, 10, 3),  # FedAvg's server over N = 64; 0.3 * 10 > 3.
])
def test_auto_f_is_the_attackers_a_full_group_holds(fraction, group_size, f):
    assert rules.auto_f(fraction, group_size) == f


@pytest.mark.slow  # 15 group shapes per rule, each op compiled eagerly: 25 s of the fast tier.
@pytest.mark.parametrize("name", ["mean", "median", "trimmed_mean", "krum", "centered_clip"])
def test_a_rule_is_the_mean_exactly_where_it_declares_it(name):
    """Rule.equals_mean(params, M) against the rule itself: the mean in groups of every size up
    to M where it says so, and not the mean of a full group of M where it does not."""
    for size in (1, 2, 3, 4, 5):
        for f in (0, 1, 2):
            params = rules.Params(f=f, tau=0.3, iterations=2)
            tree, present = _slots(6, size, seed=10 * size + f)
            present[2:] = True  # Full groups beside the random ones (and nobody, one member).
            got = rules.get(name).combine(tree, jnp.asarray(present), params)
            mean = _reference("mean", tree, present, params)
            same = [np.allclose(np.asarray(got[k]), mean[k], atol=1e-5) for k in tree]
            if rules.get(name).equals_mean(params, size):
                assert all(same), (name, size, f)
            elif size > 1:
                assert not all(same), (name, size, f)
    assert rules.get("trimmed_mean").equals_mean(rules.Params(f=0), 4)
    assert not rules.get("trimmed_mean").equals_mean(rules.Params(f=1), 4)
    assert not rules.get("krum").equals_mean(rules.Params(f=0), 4)  # Picks a copy.


def _warnings(config):
    """The warnings the run of `config` would log about its rule."""
    from unittest import mock

    with mock.patch.object(assemble.logging, "warning") as warning:
        assemble.report_rule(config, assemble.algorithm(config))
    return [call.args[0] % call.args[1:] for call in warning.call_args_list]


def test_a_rule_that_is_the_mean_says_so_in_one_warning_line():
    from marfl_jax.config import Config

    (line,) = _warnings(Config(aggregator="trimmed_mean", aggregator_f=0).validate())
    assert line.startswith("--aggregator=trimmed_mean is exactly the group mean here (f = 0 "
                           "from --aggregator_f=0, groups of at most 4")
    assert line.endswith("set --aggregator_f to 1") and "\n" not in line
    (pairs,) = _warnings(Config(aggregator="median", algorithm="gossip").validate())
    assert pairs.endswith("(groups of at most 2 with --algorithm=gossip): choose another "
                          "--aggregator or larger groups")
    (auto,) = _warnings(Config(aggregator="trimmed_mean", algorithm="gossip").validate())
    assert "no --aggregator_f changes that" in auto
    attacked = dict(byzantine_fraction=0.1, attack="sign_flip")
    for robust in (dict(aggregator="trimmed_mean", **attacked),  # auto: f = 1 in groups of 4.
                   dict(aggregator="trimmed_mean"),  # No attackers: auto still gives 1.
                   dict(aggregator="krum", aggregator_f=0),  # Picks a copy: not the mean.
                   dict(aggregator="centered_clip", clip_tau=1.0),
                   dict(aggregator="mean", aggregator_f=0), dict(aggregator="mean",
                                                                algorithm="gossip")):
        assert not _warnings(Config(**robust).validate()), robust


def test_a_run_warns_before_it_loads_its_data(monkeypatch, caplog, tmp_path):
    """Through absl's logging, once, before the heavy work (here: the data, which fails)."""
    from marfl_jax.config import Config

    def no_data(config):
        raise RuntimeError("no data here")

    monkeypatch.setattr(assemble, "load_data", no_data)
    with pytest.raises(RuntimeError, match="no data here"):
        assemble.assemble(Config(aggregator="trimmed_mean", aggregator_f="0"), str(tmp_path),
                          None)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "is exactly the group mean" in warned[0], warned
