"""Byzantine peers: a fixed pool of attackers, where they sit in the groups, what they send.

    pool(num_peers, fraction, seed) -> (N,) bool        # drawn once per run from the seed
    collude(group_ids (N,), byzantine (N,)) -> (N,)     # attackers packed into the same groups
    flip_labels(labels (N, ...), byzantine (N,), num_classes)
    message_transform(adversary, roundtrip) -> transform(slots, filled, slot_peer, key)

The pool is `floor(fraction * N)` peers drawn from the seed alone (a run and its resumption see
the same attackers). Churn samples attackers like everyone else: the pool is fixed, the number
present in a round is not. Attackers follow the protocol's timing and message sizes (the ledger
and the clock are unchanged); what they send is `--attack` (`marfl_jax.attacks`), forged per
round and per group from the honest present mates' copies (omniscient within the group), then
encoded by the codec like every message. `label_flip` instead trains the attackers on labels
`num_classes - 1 - y` (ByzFL's LabelFlipping) and leaves their messages honest.

Placement (`--byzantine_placement`): `random` leaves the attackers where the algorithm's schedule
puts them. `collude` models attackers that announce the group keys that put them together: in
every round they take, group by group in order of group id, every place of a group but one
(at least one honest member is left, whom they attack), and each honest peer they displace takes
the place one of them left, so every group keeps its size (the matchmaking keeps its group size).
The honest peers' own keys are not rewritten (their next round follows the schedule as drawn).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from marfl_jax import attacks

PLACEMENTS = ("random", "collude")


class Adversary(NamedTuple):
    """The run's attackers (static under jit).

    Attributes:
      byzantine: (N,) bool numpy, the pool.
      attack: what they send (`marfl_jax.attacks.Attack`).
      params: the attack's parameters.
      placement: one of PLACEMENTS.
      num_classes: the task's classes (label flipping).
    """

    byzantine: np.ndarray
    attack: attacks.Attack
    params: attacks.Params
    placement: str = "random"
    num_classes: int = 10

    @property
    def honest(self) -> np.ndarray:
        """(N,) bool, the honest peers."""
        return ~self.byzantine


def pool_size(num_peers: int, fraction: float) -> int:
    """floor(fraction * N) attackers (with a small tolerance for fractions like 0.1 * 30)."""
    return int(np.floor(fraction * num_peers + 1e-9))


def pool(num_peers: int, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: `pool_size` peers drawn without replacement from the seed alone."""
    rng = np.random.default_rng([seed, 0x62797A])  # "byz": apart from every other draw.
    chosen = rng.choice(num_peers, size=pool_size(num_peers, fraction), replace=False)
    byzantine = np.zeros(num_peers, bool)
    byzantine[chosen] = True
    return byzantine


def collude(group_ids: jax.Array, byzantine: jax.Array, num_groups: int) -> jax.Array:
    """One round's group ids with the present attackers packed together (module docstring).

    group_ids: (N,) int32 in [0, num_groups), -1 absent; byzantine: (N,) bool.
    Returns (N,) int32: the same multiset of group sizes; attackers fill groups in order of
    group id, leaving one place per group to an honest peer; absent peers stay -1."""
    n = group_ids.shape[0]
    present = group_ids >= 0
    group = jnp.where(present, group_ids, num_groups)  # Absent peers: a discarded group.
    # The round's places, ordered by group then by peer id (absent peers last).
    place_group = group[jnp.argsort(group, stable=True)]
    sizes = jnp.zeros(num_groups + 1, jnp.int32).at[place_group].add(1)
    rank = jnp.arange(n) - (jnp.cumsum(sizes) - sizes)[place_group]  # Rank within its group.
    valid = place_group < num_groups
    attacking, honest = present & byzantine, present & ~byzantine
    open_place = valid & (rank < sizes[place_group] - 1)  # All but each group's last place.
    taken = open_place & (jnp.cumsum(open_place) <= attacking.sum())  # The attackers' places.
    # The k-th attacker (by peer id) takes the k-th taken place; the k-th present honest peer
    # the k-th other valid place.
    new_ids = jnp.full(n, -1, group_ids.dtype)
    for peers, places in ((attacking, taken), (honest, valid & ~taken)):
        k = jnp.arange(n)
        new_ids = new_ids.at[jnp.where(k < peers.sum(), _true_first(peers), n)].set(
            place_group[_true_first(places)].astype(group_ids.dtype), mode="drop")
    return new_ids


def _true_first(mask: jax.Array) -> jax.Array:
    """Indices of `mask`'s True entries in order, then the others'."""
    return jnp.argsort(~mask, stable=True)


def collude_schedule(schedule: jax.Array, byzantine: jax.Array, num_groups: int) -> jax.Array:
    """`collude` for every round of a (G, N) schedule."""
    return jax.vmap(lambda ids: collude(ids, byzantine, num_groups))(schedule)


def flip_labels(labels: jax.Array, byzantine: jax.Array, num_classes: int) -> jax.Array:
    """labels (N, ...) int with every attacker's replaced by num_classes - 1 - y."""
    mask = byzantine.reshape((-1,) + (1,) * (labels.ndim - 1))
    return jnp.where(mask, num_classes - 1 - labels, labels)


def message_transform(adversary: Adversary | None, roundtrip=None):
    """What the members of a group receive from what they hold, one round's slots at a time:
    the attack (when there is one), then the codec's round trip (when lossy).

    Returns None when nothing changes, else
      transform(slots: tree of (G, M, ...) leaves (None for integer leaves), filled (G, M) bool,
                slot_peer (G, M) int32 (the peer in each slot, -1 empty), key) -> slots."""
    forging = adversary is not None and adversary.attack.forge is not None
    if not forging and roundtrip is None:
        return None
    byzantine = None if adversary is None else jnp.asarray(adversary.byzantine)

    def transform(slots, filled, slot_peer, key):
        if forging:
            in_slot = jnp.where(slot_peer >= 0, byzantine[jnp.maximum(slot_peer, 0)], False)
            slots = adversary.attack.apply(slots, filled, in_slot, key, adversary.params)
        if roundtrip is not None:
            slots = jax.tree.map(lambda x: None if x is None else _roundtrip_slots(roundtrip, x),
                                 slots, is_leaf=lambda x: x is None)
        return slots

    return transform


def _roundtrip_slots(roundtrip, x: jax.Array) -> jax.Array:
    """A per-peer round trip applied to every slot's copy: (G, M, ...) as (G * M, ...)."""
    flat = x.reshape((-1,) + x.shape[2:])
    return roundtrip(flat).reshape(x.shape)
