"""Byzantine peers (marfl_jax/adversary.py): the pool, colluding placement, label flipping, and
attacks inside one round of group mixing against a per-group NumPy reference."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marfl_jax import adversary, assemble, attacks, mixing, rules
from marfl_jax.config import Config, ConfigError
from tests.simulate import simulate


def test_the_pool_is_floor_fraction_n_drawn_from_the_seed():
    a = adversary.pool(64, 0.1, seed=0)
    assert a.dtype == bool and a.sum() == 6
    np.testing.assert_array_equal(a, adversary.pool(64, 0.1, seed=0))
    assert not np.array_equal(a, adversary.pool(64, 0.1, seed=1))
    assert adversary.pool(30, 0.1, seed=0).sum() == 3  # floor(0.1 * 30) despite 0.1 * 30 < 3.
    assert adversary.pool(10, 0.0, seed=0).sum() == 0


def _count_together(schedule: np.ndarray, byzantine: np.ndarray) -> int:
    """Pairs of attackers sharing a group, summed over rounds."""
    total = 0
    for ids in schedule:
        for g in np.unique(ids[ids >= 0]):
            k = int((byzantine & (ids == g)).sum())
            total += k * (k - 1) // 2
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collusion_keeps_groups_and_presence_and_packs_attackers(seed):
    algorithm = assemble.algorithm(Config(num_peers=64, group_size=4, key_dim=3))
    rng = np.random.default_rng(seed)
    present = rng.random((algorithm.num_rounds, 64)) < 0.85
    schedule = np.asarray(algorithm.schedule(jnp.asarray(present), jax.random.key(0)))
    byzantine = adversary.pool(64, 0.2, seed)  # 12 attackers.
    packed = np.asarray(jax.jit(adversary.collude_schedule, static_argnums=2)(
        jnp.asarray(schedule), jnp.asarray(byzantine), algorithm.num_groups))
    for before, after in zip(schedule, packed, strict=True):
        np.testing.assert_array_equal(after >= 0, before >= 0)  # Same peers present.
        sizes = lambda ids: np.bincount(ids[ids >= 0], minlength=algorithm.num_groups)  # noqa: E731
        np.testing.assert_array_equal(sizes(after), sizes(before))  # Same groups' sizes.
        for g in np.unique(after[after >= 0]):  # Every group keeps an honest member.
            members = after == g
            assert (members & ~byzantine).any() or members.sum() == 1
    assert _count_together(packed, byzantine) > _count_together(schedule, byzantine)


def test_collusion_fills_the_first_groups_but_one_place_each():
    ids = jnp.asarray([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, -1, 2])
    byzantine = jnp.asarray([False] * 8 + [True, True, True, True])  # Peer 10 is absent.
    out = np.asarray(adversary.collude(ids, byzantine, 3))
    assert out[10] == -1
    np.testing.assert_array_equal(out[[8, 9, 11]], [0, 0, 0])  # 3 attackers: group 0, 3 of 4.
    assert np.bincount(out[out >= 0]).tolist() == [4, 4, 3]


def test_label_flipping_is_byzfls():
    labels = jnp.arange(12).reshape(3, 4) % 10
    out = np.asarray(adversary.flip_labels(labels, jnp.asarray([False, True, False]), 10))
    labels = np.asarray(labels)
    np.testing.assert_array_equal(out[1], 9 - labels[1])
    np.testing.assert_array_equal(out[[0, 2]], labels[[0, 2]])


def _reference_round(tree, group_ids, byzantine, attack, params, rule_name, f):
    """One round, per group in NumPy: attackers forge from their group's honest present
    copies, then every present member takes the rule over the group's (forged) copies."""
    out = {k: v.copy() for k, v in tree.items()}
    for g in np.unique(group_ids[group_ids >= 0]):
        members = np.flatnonzero(group_ids == g)
        honest = members[~byzantine[members]]
        sent = {k: v[members].astype(np.float64) for k, v in tree.items()}
        if honest.size and attack != "none":
            for k, v in tree.items():
                h = v[honest].astype(np.float64)
                forged = -h.mean(0) if attack == "sign_flip" else -params.tau * h.mean(0)
                sent[k][byzantine[members]] = forged
        for k in tree:
            x = sent[k]
            if rule_name == "mean":
                value = x.mean(0)
            else:  # trimmed_mean
                fg = min(f, (len(members) - 1) // 2)
                s = np.sort(x, axis=0)
                value = s[fg:len(members) - fg].mean(0)
            out[k][members] = value
    return out


@pytest.mark.parametrize("attack", ["none", "sign_flip", "ipm"])
@pytest.mark.parametrize("rule_name", ["mean", "trimmed_mean"])
def test_one_round_equals_its_per_group_reference(attack, rule_name):
    rng = np.random.default_rng(3)
    n, num_groups = 13, 4
    group_ids = rng.integers(-1, num_groups, n)
    byzantine = rng.random(n) < 0.3
    tree = {"w": rng.normal(size=(n, 3, 2)).astype(np.float32),
            "b": rng.normal(size=(n, 5)).astype(np.float32)}
    params = attacks.Params(tau=2.0)
    adv = adversary.Adversary(byzantine, attacks.get(attack), params)
    transform = adversary.message_transform(adv)
    rule = rules.get(rule_name, rules.Params(f=1))
    got = jax.jit(lambda t: mixing.mix(t, jnp.asarray(group_ids)[None], mixing.mixer(
        num_groups, rule, transform=transform), jax.random.key(0)))(tree)
    want = _reference_round(tree, group_ids, byzantine, attack, params, rule_name, 1)
    for k in tree:
        chex.assert_trees_all_close(np.asarray(got[k]), want[k].astype(np.float32),
                                    rtol=1e-5, atol=1e-6)


def test_the_transform_encodes_after_the_attack():
    """A lossy codec's round trip is applied to what attackers forged."""
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(2, 4, 6)).astype(np.float32)}
    filled = jnp.ones((2, 4), bool)
    slot_peer = jnp.arange(8).reshape(2, 4)
    adv = adversary.Adversary(np.arange(8) % 4 == 0, attacks.get("sign_flip"), attacks.Params())
    half = lambda x: x.astype(jnp.float16).astype(jnp.float32)  # noqa: E731
    encoded = adversary.message_transform(adv, half)(tree, filled, slot_peer, jax.random.key(0))
    plain = adversary.message_transform(adv)(tree, filled, slot_peer, jax.random.key(0))
    chex.assert_trees_all_equal(encoded, jax.tree.map(half, plain))
    honest_mean = tree["w"][:, 1:].mean(1)
    chex.assert_trees_all_close(plain["w"][:, 0], -honest_mean, rtol=1e-6)


MLP = Config(model="mlp", num_peers=16, group_size=4, key_dim=2, local_batches=1,
             batch_size=8)


def test_attackers_are_counted_and_only_honest_peers_measured():
    rows, _ = simulate(dataclasses.replace(MLP, byzantine_fraction=0.25, attack="sign_flip"), 2)
    assert all(r["byzantine_peers"] == 4 for r in rows)
    plain, _ = simulate(MLP, 2)
    assert "byzantine_peers" not in plain[0]
    for attacked, honest_row in zip(rows, plain, strict=True):  # Same sizes: same ledger.
        assert (attacked["bytes"], attacked["messages"]) == (honest_row["bytes"],
                                                             honest_row["messages"])


@pytest.mark.parametrize("changes, message", [
    (dict(attack="sign_flip"), "an attack needs attackers"),
    (dict(byzantine_fraction=0.25), "an attack needs attackers"),
    (dict(byzantine_fraction=0.5, attack="sign_flip"), "byzantine_fraction"),
    (dict(byzantine_fraction=0.25, attack="sign_flip", dp=True), "not allowed with --dp"),
    (dict(byzantine_fraction=0.25, attack="sign_flip", wire="butterfly"), "butterfly"),
    (dict(aggregator="median", wire="butterfly"), "butterfly"),
    (dict(aggregator="trimmed_mean", aggregator_f=2), "no honest majority"),
    (dict(byzantine_fraction=0.25, attack="nope"), "attack"),
    (dict(byzantine_fraction=0.25, attack="sign_flip", byzantine_placement="x"), "placement"),
])
def test_bad_combinations_are_refused_before_any_work(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(MLP, **changes).validate()


def test_a_robust_rule_takes_decoded_copies_under_a_lossy_codec():
    """median with int8: every copy goes through the codec's round trip in the slots."""
    config = dataclasses.replace(MLP, aggregator="median", codec="int8")
    rows, state = simulate(config, 1)
    plain, plain_state = simulate(dataclasses.replace(config, codec="float32"), 1)
    assert rows[0]["bytes"] < plain[0]["bytes"]
    assert rows[0]["train_loss"] == plain[0]["train_loss"]  # Same local update ...
    assert not np.array_equal(np.asarray(jax.tree.leaves(state.params)[0]),  # ... other mix.
                              np.asarray(jax.tree.leaves(plain_state.params)[0]))


def test_churn_samples_the_pool_like_everyone_else():
    config = dataclasses.replace(MLP, byzantine_fraction=0.25, attack="alie", dropout=0.5)
    rows, _ = simulate(config, 4)
    counts = [r["byzantine_peers"] for r in rows]
    assert all(0 <= c <= 4 for c in counts) and len(set(counts)) > 1, counts
