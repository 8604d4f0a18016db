"""In-group attacks (marfl_jax/attacks.py) against their ByzFL definitions, per group in NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from marfl_jax import assemble, attacks

SHAPES = ((3, 2), (4,), ())


def _round(groups, slots, seed):
    rng = np.random.default_rng(seed)
    tree = {f"l{i}": rng.normal(size=(groups, slots) + shape).astype(np.float32)
            for i, shape in enumerate(SHAPES)}
    present = rng.random((groups, slots)) < 0.8
    byzantine = rng.random((groups, slots)) < 0.4
    byzantine[0] = True  # Nobody honest: attackers send their own copies.
    byzantine[1], present[1] = np.arange(slots) == 0, True  # One attacker ...
    byzantine[2], present[2] = np.arange(slots) != 1, True  # ... one honest member.
    return tree, present, byzantine


def _reference(name, tree, present, byzantine, params):
    """What each slot sends, written plainly per group (float64)."""
    out = {k: x.astype(np.float64).copy() for k, x in tree.items()}
    for g in range(present.shape[0]):
        honest = np.flatnonzero(present[g] & ~byzantine[g])
        attackers = np.flatnonzero(present[g] & byzantine[g])
        if honest.size == 0:
            continue
        for k, x in tree.items():
            h = x[g, honest].astype(np.float64)
            if name == "sign_flip":
                vector = -h.mean(0)
            elif name == "ipm":
                vector = -params.tau * h.mean(0)
            elif name == "alie":
                std = np.std(h, 0, ddof=1) if honest.size > 1 else np.zeros(h.shape[1:])
                vector = h.mean(0) + params.tau * std
            else:
                vector = x[g, 0]  # none / label_flip: overwritten below.
            for a in attackers:
                out[k][g, a] = vector if name not in ("none", "label_flip") else x[g, a]
    return out


class AttackTest(chex.TestCase, parameterized.TestCase):

    @chex.variants(with_jit=True)  # Jitted, as the step runs them.
    @parameterized.parameters("none", "sign_flip", "ipm", "alie", "label_flip")
    def test_every_attack_is_its_definition(self, name):
        attack = attacks.ATTACKS.get(name)
        for seed, (groups, slots) in enumerate(((4, 4), (5, 3), (3, 6))):
            tree, present, byzantine = _round(groups, slots, seed)
            params = attacks.Params(sigma=1.0, tau=[1.5, 2.0, -0.5][seed] if name != "ipm"
                                    else [1.5, 2.0, 0.5][seed])
            sent = self.variant(lambda t, p, b, k, a=attack, q=params: a.apply(t, p, b, k, q))(
                jax.tree.map(jnp.asarray, tree), jnp.asarray(present), jnp.asarray(byzantine),
                jax.random.key(seed))
            want = _reference(name, tree, present, byzantine, params)
            for k in tree:
                np.testing.assert_allclose(np.asarray(sent[k]), want[k], atol=1e-5, rtol=1e-5,
                                           err_msg=f"{name} {seed} {k}")

    @chex.variants(with_jit=True)  # Jitted, as the step runs them.
    def test_gaussian_is_independent_noise_of_sigma_in_the_attackers_slots(self):
        tree, present, byzantine = _round(4, 5, seed=3)
        key = jax.random.key(11)
        params = attacks.Params(sigma=0.3)
        sent = self.variant(lambda t, p, b, k: attacks.ATTACKS.get("gaussian").apply(
            t, p, b, k, params))(tree, jnp.asarray(present), jnp.asarray(byzantine), key)
        honest_any = (present & ~byzantine).any(1, keepdims=True)
        attacking = present & byzantine & honest_any
        for i, k in enumerate(sorted(tree)):  # jax.tree.leaves order of a dict: sorted keys.
            noise = np.asarray(0.3 * jax.random.normal(jax.random.fold_in(key, i),
                                                       tree[k].shape))
            mask = attacking.reshape(attacking.shape + (1,) * (tree[k].ndim - 2))
            np.testing.assert_allclose(np.asarray(sent[k]), np.where(mask, noise, tree[k]),
                                       atol=1e-6, err_msg=k)
        big = {"w": jnp.zeros((2, 3, 20000))}
        present, byzantine = jnp.ones((2, 3), bool), jnp.array([[1, 1, 0], [0, 0, 0]], bool)
        noise = np.asarray(attacks.ATTACKS.get("gaussian").apply(
            big, present, byzantine, key, params)["w"])
        assert abs(noise[0, :2].std() - 0.3) < 0.01 and abs(noise[0, :2].mean()) < 0.01
        assert not np.allclose(noise[0, 0], noise[0, 1])  # Each attacker draws its own.
        assert (noise[0, 2] == 0).all() and (noise[1] == 0).all()

    def test_label_flip_poisons_labels_and_leaves_messages(self):
        assert attacks.ATTACKS.get("label_flip").poisons_labels
        assert not any(attacks.ATTACKS.get(n).poisons_labels
                       for n in ("none", "sign_flip", "gaussian", "alie", "ipm"))

    def test_absent_attackers_and_integer_leaves_are_untouched(self):
        tree = {"w": jnp.ones((1, 3, 2)), "count": None}
        present = jnp.array([[True, True, False]])
        byzantine = jnp.array([[False, True, True]])
        sent = attacks.ATTACKS.get("sign_flip").apply(tree, present, byzantine,
                                                      jax.random.key(0))
        assert sent["count"] is None
        np.testing.assert_array_equal(np.asarray(sent["w"])[0, :, 0], [1.0, -1.0, 1.0])


@pytest.mark.parametrize("name", ["alie", "ipm", "gaussian"])
def test_params_come_from_the_config(name):
    from marfl_jax.config import Config, ConfigError

    config = Config(attack=name, attack_sigma=0.5, attack_tau=3.0,
                    byzantine_fraction=0.1).validate()
    assert assemble.attack_params(config) == attacks.Params(sigma=0.5, tau=3.0)
    assert attacks.get(config.attack) is attacks.ATTACKS.get(name)
    with pytest.raises(ConfigError, match="--attack_sigma=-1.0 is not allowed"):
        Config(attack=name, attack_sigma=-1.0, byzantine_fraction=0.1).validate()
    if name == "ipm":
        with pytest.raises(ConfigError, match="--attack_tau=0.0 is not allowed"):
            Config(attack=name, attack_tau=0.0, byzantine_fraction=0.1).validate()
