"""Byzantine attacks on a group's messages (`--attack`): pure device-side functions.

An attack sees one round's groups in the slots of a group rule (`marfl_jax.rules`): `received`,
a pytree of (num_groups, max_group_size, ...) leaves (member r of group g's copy at [g, r];
integer leaves may be None), `present` (G, M) bool the filled slots and `byzantine` (G, M) bool
the members that attack. `Attack.apply(received, present, byzantine, key, params)` returns the
tree with every present Byzantine member's copy replaced by what it sends; honest and absent
members keep theirs. Assumption: the attackers are omniscient WITHIN their group: they know the
copies of their group's honest present mates in this round (nothing of other groups), as ByzFL's
attacks take the honest vectors. A group with no honest present member has nothing to forge
from: its attackers send their own copies unchanged.

Each attack is a `forge(received, honest, key, params)` with `honest` (G, M) the honest present
slots, returning a tree of (G, ...) leaves (the same vector for every attacker of a group, as
ByzFL's `ByzantineClient` sends one vector f times) or (G, M, ...) leaves (one per slot). The
definitions are ByzFL's (LPD-EPFL/byzfl, byzfl/attacks/attacks.py), over the group's honest
present copies x_1..x_h, per coordinate:
* `sign_flip`: -mean(x) (SignFlipping);
* `ipm`: -tau * mean(x) (InnerProductManipulation; ByzFL's default tau 2.0);
* `alie`: mean(x) + tau * std(x), std with ddof=1 as ByzFL's code computes it (its docstring
  says 1/n), and 0 with a single honest copy (ALittleIsEnough; default tau 1.5);
* `gaussian`: N(0, sigma^2) per coordinate, independent per attacker: leaf i of the tree (in
  `jax.tree.leaves` order) is sigma * jax.random.normal(jax.random.fold_in(key, i), (G, M, ...))
  (Gaussian with mu = 0);
* `none`: nothing changes; `label_flip`: a data poisoning attack (ByzFL's LabelFlipping acts on
  the attackers' labels before training), so its messages are unchanged here and its record
  says `poisons_labels=True` for whoever prepares the data.

    import jax
    import jax.numpy as jnp
    from marfl_jax.attacks import ATTACKS, Attack, honest_mean

    ATTACKS.register("zero", Attack(lambda received, honest, key, params: jax.tree.map(
        jnp.zeros_like, honest_mean(received, honest))))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from marfl_jax.registry import Registry


class Params(NamedTuple):
    """An attack's parameters (hashable: static under jit)."""

    sigma: float = 1.0  # --attack_sigma: gaussian's standard deviation.
    tau: float = 1.5  # --attack_tau: alie's and ipm's factor.


def _slots(mask: jax.Array, x: jax.Array) -> jax.Array:
    """mask (G, M) broadcast against x (G, M, ...)."""
    return mask.reshape(mask.shape + (1,) * (x.ndim - 2))


def _per_group(v: jax.Array, like: jax.Array) -> jax.Array:
    """v (G,) broadcast against like (G, ...)."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def honest_mean(received, honest: jax.Array):
    """Each group's mean of its honest copies: tree of (G, ...) leaves (0 where none)."""
    count = jnp.maximum(honest.sum(axis=1), 1)

    def leaf(x):
        total = jnp.where(_slots(honest, x), x, 0).sum(axis=1)
        return total / _per_group(count, total).astype(x.dtype)

    return jax.tree.map(leaf, received)


def honest_std(received, honest: jax.Array):
    """Each group's coordinate-wise sample standard deviation (ddof=1) of its honest copies:
    tree of (G, ...) leaves (0 with fewer than two)."""
    count = honest.sum(axis=1)
    mean = honest_mean(received, honest)

    def leaf(x, m):
        squares = jnp.where(_slots(honest, x), jnp.square(x - m[:, None]), 0).sum(axis=1)
        variance = squares / _per_group(jnp.maximum(count - 1, 1), squares).astype(x.dtype)
        return jnp.where(_per_group(count >= 2, variance), jnp.sqrt(variance), 0)

    return jax.tree.map(leaf, received, mean)


class Attack(NamedTuple):
    """An attack.

    Attributes:
      forge: (received tree of (G, M, ...) leaves, honest (G, M) bool, key, params: Params) ->
        tree of (G, ...) or (G, M, ...) leaves, what the group's attackers send.
      description: one line for the log and --help.
      poisons_labels: a data poisoning attack: messages are left as they are (`forge` is not
        called); the attackers' labels are to be flipped where the data is prepared.
      check: (params) -> None, or what is wrong with them, naming the flag (asked at
        validation, before any work).
    """

    forge: Callable[[Any, jax.Array, jax.Array, Params], Any] | None
    description: str = ""
    poisons_labels: bool = False
    check: Callable[[Params], str | None] | None = None

    def apply(self, received, present: jax.Array, byzantine: jax.Array, key: jax.Array,
              params: Params | None = None):
        """received with every present Byzantine member's copy replaced by the forged one, in
        groups that have an honest present member; the rest unchanged."""
        if self.forge is None:
            return received
        params = Params() if params is None else params
        honest = present & ~byzantine
        attacking = present & byzantine & honest.any(axis=1, keepdims=True)
        forged = self.forge(received, honest, key, params)

        def replace(x, v):
            if x is None:
                return x
            v = v if v.ndim == x.ndim else jnp.broadcast_to(v[:, None], x.shape)
            return jnp.where(_slots(attacking, x), v.astype(x.dtype), x)

        return jax.tree.map(replace, received, forged, is_leaf=lambda x: x is None)


ATTACKS: Registry[Attack] = Registry("attack")


def sign_flip(received, honest, key, params):
    del key, params
    return jax.tree.map(jnp.negative, honest_mean(received, honest))


def ipm(received, honest, key, params):
    del key
    return jax.tree.map(lambda m: -params.tau * m, honest_mean(received, honest))


def alie(received, honest, key, params):
    del key
    return jax.tree.map(lambda m, s: m + params.tau * s, honest_mean(received, honest),
                        honest_std(received, honest))


def gaussian(received, honest, key, params):
    del honest
    leaves, treedef = jax.tree.flatten(received)
    return treedef.unflatten([
        (params.sigma * jax.random.normal(jax.random.fold_in(key, i), x.shape)).astype(x.dtype)
        for i, x in enumerate(leaves)])


ATTACKS.register("none", Attack(None, "honest: every member sends its own copy"))
ATTACKS.register("sign_flip", Attack(sign_flip, "minus the group's honest mean"))
ATTACKS.register("gaussian", Attack(gaussian, "N(0, sigma^2) per coordinate (--attack_sigma)"))
ATTACKS.register("alie", Attack(alie, "a little is enough: honest mean + tau * honest std "
                                "(--attack_tau)"))
def _positive_tau(params: Params) -> str | None:
    return None if params.tau > 0 else (
        f"--attack_tau={params.tau!r} is not allowed with --attack=ipm; use a number > 0 (it "
        "sends -tau times the honest mean)")


ATTACKS.register("ipm", Attack(ipm, "inner product manipulation: -tau * the honest mean "
                               "(--attack_tau)", check=_positive_tau))
ATTACKS.register("label_flip", Attack(None, "data poisoning: flipped labels, messages as they "
                                      "are", poisons_labels=True))


def get(name: str) -> Attack:
    """The Attack registered as `name` (ConfigError naming --attack if none)."""
    return ATTACKS.get(name)
