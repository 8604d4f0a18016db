"""Group rules: how a group's member combines the copies it receives in one round (`--aggregator`).

A rule sees one round's groups gathered into slots: `received` (num_groups, max_group_size, ...)
holds member r of group g's copy at [g, r] (r = its rank by peer id, `mixing.rank_in_group`) and
`present` (num_groups, max_group_size) bool marks the filled slots (empty slots hold zeros and
must not count). `combine(received, present)` returns (num_groups, ...): the value every present
member of the group takes. `mixing.combine_groups` gathers, applies the rule and scatters back;
absent peers keep their values and integer leaves are never combined.

`exact_mean=True` promises that the rule IS the unweighted mean of the present members, which
lets `mixing.mix` use the mean's fast paths instead of the slots: the grid reshape-mean
(`mixing.grid_mean`), segment sums (`mixing.group_mean`) and the lossy codecs' algebra
(`mixing.coded_group_mean`). Any other rule runs through the slots.

    from marfl_jax.rules import RULES, Rule

    RULES.register("midrange", Rule(lambda received, present: 0.5 * (
        jnp.where(present[..., None], received, jnp.inf).min(1)
        + jnp.where(present[..., None], received, -jnp.inf).max(1))))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from marfl_jax.registry import Registry


class Rule(NamedTuple):
    """A group rule.

    Attributes:
      combine: (received (G, M, ...), present (G, M) bool) -> (G, ...), the value every present
        member of each group takes (same dtype as `received`).
      exact_mean: the rule is the unweighted mean of the present members (the fast paths).
      description: one line for the log and --help.
    """

    combine: Callable[[jax.Array, jax.Array], jax.Array]
    exact_mean: bool = False
    description: str = ""


RULES: Registry[Rule] = Registry("aggregator")


def present_like(present: jax.Array, received: jax.Array) -> jax.Array:
    """present (G, M) broadcast against received (G, M, ...)."""
    return present.reshape(present.shape + (1,) * (received.ndim - 2))


def mean(received: jax.Array, present: jax.Array) -> jax.Array:
    """The unweighted mean of the present members' copies."""
    mask = present_like(present, received)
    count = jnp.maximum(present.sum(axis=1), 1).astype(received.dtype)
    total = jnp.where(mask, received, 0).sum(axis=1)
    return total / count.reshape(count.shape + (1,) * (total.ndim - 1))


def median(received: jax.Array, present: jax.Array) -> jax.Array:
    """The coordinate-wise median of the present members' copies (the mean of the two middle
    values for an even count)."""
    mask = present_like(present, received)
    ordered = jnp.sort(jnp.where(mask, received, jnp.inf), axis=1)  # Empty slots sort last.
    count = present.sum(axis=1)
    shape = count.shape + (1,) * (received.ndim - 1)
    low = jnp.take_along_axis(ordered, (jnp.maximum(count - 1, 0) // 2).reshape(shape), axis=1)
    high = jnp.take_along_axis(ordered, (count // 2).reshape(shape), axis=1)
    middle = (0.5 * (low + high))[:, 0]
    return jnp.where(count.reshape(count.shape + (1,) * (middle.ndim - 1)) > 0, middle, 0)


RULES.register("mean", Rule(mean, exact_mean=True, description="the unweighted group mean"))
RULES.register("median", Rule(median, description="the coordinate-wise median of the group"))


def get(rule: str | Rule | None) -> Rule:
    """A Rule from a registered name, a Rule, or None (the mean)."""
    if rule is None:
        return RULES.get("mean")
    return RULES.get(rule) if isinstance(rule, str) else rule
