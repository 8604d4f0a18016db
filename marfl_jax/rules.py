"""Group rules: how a group's member combines the copies it receives in one round (`--aggregator`).

A rule sees one round's groups gathered into slots, the whole message at once: `received` is a
pytree (the message's structure: weights and momentum of every layer) whose floating leaves are
(num_groups, max_group_size, ...), member r of group g's copy at [g, r] (r = its rank by peer
id, `mixing.rank_in_group`); integer leaves are None there (they are never combined).
`present` (num_groups, max_group_size) bool marks the filled slots (empty slots hold zeros and
must not count). `combine(received, present, params)` returns the same tree with (num_groups,
...) leaves: the value every present member of the group takes. `params` (`Params`: f, tau,
iterations; the flags --aggregator_f, --clip_tau, --clip_iterations) is the Rule's own
`params` field (`Rule.with_params`, `get(name, params)`). `mixing.combine_groups` gathers,
applies the rule once per round and scatters back; absent peers keep their values.

`coordinatewise(fn)` lifts a per-leaf function `fn(received (G, M, ...), present) -> (G, ...)`
(mean, median) to a rule over the tree. Rules that need the whole copy (krum's distances,
centered clipping's norms) sum over all leaves.

`exact_mean=True` promises that the rule IS the unweighted mean of the present members, which
lets `mixing.mix` use the mean's fast paths instead of the slots: the grid reshape-mean
(`mixing.grid_mean`), segment sums (`mixing.group_mean`) and the lossy codecs' algebra (the
wire's `combine`: `mixing.coded_allgather`, ...). Any other rule runs through the slots, where
what members receive can differ from what their mates hold (`mixing.mix`'s `transform`: a lossy
codec's round trip of every copy, the member's own included, after any Byzantine attack).

    from marfl_jax.rules import RULES, Rule, coordinatewise

    RULES.register("midrange", Rule(coordinatewise(lambda received, present: 0.5 * (
        jnp.where(present[..., None], received, jnp.inf).min(1)
        + jnp.where(present[..., None], received, -jnp.inf).max(1)))))

The robust rules follow ByzFL's definitions (LPD-EPFL/byzfl, byzfl/aggregators/aggregators.py:
TrMean, Krum, CenteredClipping). A group's number of present copies n varies (churn, small
groups), so each rule uses f_g = min(f, (n - 1) // 2) in a group of n: the largest f <= --f
with 2 f_g < n, ByzFL's requirement (it raises for 2f >= n). With n <= 2 that is f_g = 0.
The default --aggregator_f=auto is `auto_f(p, M)`: max(1, ceil(p M)) for the attacking fraction
p and the algorithm's largest group M, at most (M - 1) // 2. A rule declares when its params make
it the mean (`Rule.mean_if`, asked through `Rule.equals_mean`): a run says so in a warning.
* `trimmed_mean`: per coordinate, drop the f_g largest and f_g smallest present copies and
  average the other n - 2 f_g.
* `krum`: the present copy with the smallest sum of squared whole-copy distances (all leaves
  together) to its n - f_g - 1 nearest other present copies (ByzFL: its n - f nearest
  neighbours counting itself, i.e. sorted distance row [1 : n - f]; not Blanchard et al.'s
  n - f - 2). With f_g <= (n - 1) // 2 that is >= 1 neighbour whenever n >= 2; n = 1 takes
  the only copy. Ties go to the lowest rank.
* `centered_clip_previous` (per member, with state): centered clipping as below, but each
  member starts from its own previous output (ByzFL's CenteredClipping keeps its last output;
  at the first round the member's initial copy), kept per peer in the run state (`Rule.init`).
* `self_centered_clip` (per member): member i takes x_i + (1/n) sum_j clip(x_j - x_i, tau), its
  mates' copies clipped around its own (ClippedGossip, He, Karimireddy & Jaggi 2022, uniform
  weights within the group); a `per_member` rule returns (G, M, ...) leaves, one value per slot.
* `centered_clip`: v_0 = the group's coordinate-wise median (there is no server momentum to
  start from; ByzFL starts from 0, then from its previous output), then `iterations` times
  v <- v + (1/n) sum_i (x_i - v) min(1, tau / ||x_i - v||), norms over the whole copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from marfl_jax.registry import Registry


class Params(NamedTuple):
    """A rule's parameters (hashable: static under jit). ByzFL's defaults."""

    f: int = 0  # --aggregator_f: the Byzantine copies a group should tolerate.
    tau: float = 100.0  # --clip_tau: centered clipping's radius.
    iterations: int = 1  # --clip_iterations: centered clipping's L.


def auto_f(fraction: float, group_size: int) -> int:
    """--aggregator_f=auto: the attackers a group of `group_size` (M, the algorithm's largest
    group; a server's: N) holds at the attacking `fraction` p, max(1, ceil(p M)), at most
    (M - 1) // 2 (the honest majority the rules need). 1 without attackers, so that a robust
    rule is not the mean by default; 0 for M <= 2, where no f is allowed."""
    expected = max(1, math.ceil(fraction * group_size - 1e-9))  # 0.3 * 10 is 3.0000000000000004.
    return max(0, min(expected, (group_size - 1) // 2))


class Rule(NamedTuple):
    """A group rule.

    Attributes:
      combine: (received tree of (G, M, ...) leaves, present (G, M) bool, params: Params) ->
        tree of (G, ...) leaves, the value every present member of each group takes (same
        structure; leaves in any floating dtype, cast back by `combine_groups`).
      exact_mean: the rule is the unweighted mean of the present members (the fast paths).
      description: one line for the log and --help.
      params: what `combine` gets as `params`.
      honest_majority: the rule tolerates `params.f` copies only in a group where 2 f < n
        (validation refuses an f that a full group cannot have).
      clips: the rule clips differences to the radius `params.tau` (--clip_tau, which
        validation then requires: a radius above every difference makes it the mean).
      per_member: `combine` returns (G, M, ...) leaves, one value per member (slot [g, r] is
        what member r of group g takes), instead of one value per group.
      init: for a rule that keeps per-peer state: (the message, leaves (N, ...)) -> the state,
        leaves (N, ...) (None where nothing is kept). `combine` then takes it as a fourth
        argument, each member's own in its slot (G, M, ...), and returns (values, new state
        slots); the aggregation stage keeps it in `FLState.stages["aggregator"]`, so it is
        checkpointed with the run.
      mean_if: (params, M) -> whether `combine` with these params is the unweighted mean of
        the present copies in every group of at most M present copies (trimmed_mean with
        f_g = 0, the median of at most two copies, ...); None: no such case is declared.
        Read through `equals_mean`; a run that it finds to be the mean says so in a warning.
    """

    combine: Callable[[Any, jax.Array, Params], Any]
    exact_mean: bool = False
    description: str = ""
    params: Params = Params()
    honest_majority: bool = False
    clips: bool = False
    per_member: bool = False
    init: Callable[[Any], Any] | None = None
    mean_if: Callable[[Params, int], bool] | None = None

    def with_params(self, params: Params) -> Rule:
        return self._replace(params=params)

    def equals_mean(self, params: Params, group_size: int) -> bool:
        """Whether the rule with `params` is exactly the group mean in every group of at most
        `group_size` present copies (the mean itself: always)."""
        return self.exact_mean or (self.mean_if is not None and bool(self.mean_if(params,
                                                                                  group_size)))


RULES: Registry[Rule] = Registry("aggregator")


def coordinatewise(fn: Callable[[jax.Array, jax.Array], jax.Array]):
    """A rule's `combine` that applies a per-leaf fn(received (G, M, ...), present) -> (G, ...)
    to every leaf of the message (None leaves, the integer ones, stay None)."""

    def combine(received, present, params=None):
        del params
        return jax.tree.map(lambda x: fn(x, present), received)

    combine.__name__ = getattr(fn, "__name__", "coordinatewise")
    combine.__doc__ = fn.__doc__
    return combine


def present_like(present: jax.Array, received: jax.Array) -> jax.Array:
    """present (G, M) broadcast against received (G, M, ...)."""
    return present.reshape(present.shape + (1,) * (received.ndim - 2))


def _per_group(v: jax.Array, like: jax.Array) -> jax.Array:
    """v (G,) broadcast against like (G, ...)."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def tolerated(f: int, present: jax.Array) -> jax.Array:
    """Each group's f_g = min(f, (n - 1) // 2), n its present copies (0 if none). (G,) int32."""
    count = present.sum(axis=1).astype(jnp.int32)
    return jnp.minimum(f, jnp.maximum(count - 1, 0) // 2)


# Groups up to this size sort their copies with a compare-exchange network (XLA:CPU's general
# sort was 3x slower per iteration for groups of 4); larger ones with jnp.sort.
NETWORK_SORT_MAX = 8


def sort_slots(x: jax.Array) -> jax.Array:
    """x (G, M, ...) sorted along the member axis (ascending; the values jnp.sort gives)."""
    m = x.shape[1]
    if m > NETWORK_SORT_MAX:
        return jnp.sort(x, axis=1)
    rows = [x[:, i] for i in range(m)]
    for phase in range(m):  # Odd-even transposition: m phases sort m values.
        for i in range(phase % 2, m - 1, 2):
            rows[i], rows[i + 1] = jnp.minimum(rows[i], rows[i + 1]), jnp.maximum(rows[i],
                                                                                   rows[i + 1])
    return jnp.stack(rows, axis=1)


def mean(received: jax.Array, present: jax.Array) -> jax.Array:
    """The unweighted mean of the present members' copies (one leaf)."""
    mask = present_like(present, received)
    count = jnp.maximum(present.sum(axis=1), 1).astype(received.dtype)
    total = jnp.where(mask, received, 0).sum(axis=1)
    return total / count.reshape(count.shape + (1,) * (total.ndim - 1))


def median(received: jax.Array, present: jax.Array) -> jax.Array:
    """The coordinate-wise median of the present members' copies (the mean of the two middle
    values for an even count; one leaf)."""
    mask = present_like(present, received)
    ordered = sort_slots(jnp.where(mask, received, jnp.inf))  # Empty slots sort last.
    count = present.sum(axis=1)
    shape = count.shape + (1,) * (received.ndim - 1)
    low = jnp.take_along_axis(ordered, (jnp.maximum(count - 1, 0) // 2).reshape(shape), axis=1)
    high = jnp.take_along_axis(ordered, (count // 2).reshape(shape), axis=1)
    middle = (0.5 * (low + high))[:, 0]
    return jnp.where(count.reshape(count.shape + (1,) * (middle.ndim - 1)) > 0, middle, 0)


def trimmed_mean_leaf(received: jax.Array, present: jax.Array, f: int) -> jax.Array:
    """Per coordinate, the mean of the present copies without the f_g largest and f_g smallest
    (f_g = `tolerated(f, present)`); 0 for a group with nobody present. One leaf."""
    mask = present_like(present, received)
    ordered = sort_slots(jnp.where(mask, received, jnp.inf))  # Empty slots sort last.
    count = present.sum(axis=1).astype(jnp.int32)
    trim = tolerated(f, present)
    rank = jnp.arange(received.shape[1]).reshape((1, -1) + (1,) * (received.ndim - 2))
    low, high = present_like(trim[:, None], received), present_like((count - trim)[:, None],
                                                                    received)
    total = jnp.where((rank >= low) & (rank < high), ordered, 0).sum(axis=1)
    kept = jnp.maximum(count - 2 * trim, 1).astype(received.dtype)
    return total / _per_group(kept, total)


def trimmed_mean(received, present: jax.Array, params: Params):
    """ByzFL's TrMean with f_g per group, coordinate-wise over every leaf."""
    return jax.tree.map(lambda x: trimmed_mean_leaf(x, present, params.f), received)


def _squared_norms(tree) -> jax.Array:
    """sum over leaves and coordinates of x^2 for leaves (G, M, ...) -> (G, M) float32."""
    return sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[:2] + (-1,)).sum(-1)
               for x in jax.tree.leaves(tree))


def squared_distances(received, present: jax.Array) -> jax.Array:
    """(G, M, M) squared whole-copy distances ||x_i - x_j||^2 summed over the leaves, from Gram
    matrices of the copies centred on their group's present mean (so rounding scales with the
    spread, not the weights' size); float32, clamped at 0."""
    gram = 0.0
    for x in jax.tree.leaves(received):
        flat = x.astype(jnp.float32).reshape(x.shape[:2] + (-1,))
        centred = jnp.where(present[..., None], flat - mean(flat, present)[:, None], 0.0)
        gram = gram + jnp.einsum("gip,gjp->gij", centred, centred,
                                 precision=jax.lax.Precision.HIGHEST)
    diagonal = jnp.diagonal(gram, axis1=1, axis2=2)
    return jnp.maximum(diagonal[:, :, None] + diagonal[:, None, :] - 2.0 * gram, 0.0)


def krum_choice(received, present: jax.Array, f: int) -> jax.Array:
    """(G,) the rank of each group's Krum copy (0 where nobody is present)."""
    slots = present.shape[1]
    distances = squared_distances(received, present)
    others = present[:, None, :] & ~jnp.eye(slots, dtype=bool)[None]
    ordered = jnp.sort(jnp.where(others, distances, jnp.inf), axis=2)  # Nearest first.
    neighbours = present.sum(axis=1).astype(jnp.int32) - tolerated(f, present) - 1
    nearest = jnp.arange(slots)[None, None, :] < neighbours[:, None, None]
    scores = jnp.where(nearest, ordered, 0.0).sum(axis=2)
    return jnp.argmin(jnp.where(present, scores, jnp.inf), axis=1)


def krum(received, present: jax.Array, params: Params):
    """ByzFL's Krum with f_g per group and whole-copy distances: the chosen member's copy."""
    choice = krum_choice(received, present, params.f)
    # A group with nobody present picks slot 0, which holds zeros.
    return jax.tree.map(
        lambda x: jnp.take_along_axis(x, present_like(choice[:, None], x), axis=1)[:, 0],
        received)


def centered_clip(received, present: jax.Array, params: Params):
    """ByzFL's CenteredClipping from the group's coordinate-wise median, norms over the whole
    copy: `params.iterations` steps of radius `params.tau`."""
    count = jnp.maximum(present.sum(axis=1), 1).astype(jnp.float32)
    start = jax.tree.map(lambda x: median(x, present), received)

    def step(_, v):
        differences = jax.tree.map(lambda x, c: x - c[:, None], received, v)
        norms = jnp.sqrt(_squared_norms(differences))
        scale = jnp.where(norms > params.tau, params.tau / jnp.maximum(norms, 1e-30), 1.0)
        weights = jnp.where(present, scale, 0.0) / count[:, None]
        return jax.tree.map(
            lambda c, d: c + (present_like(weights, d).astype(d.dtype) * d).sum(axis=1),
            v, differences)

    return jax.lax.fori_loop(0, params.iterations, step, start)


MEAN = Rule(coordinatewise(mean), exact_mean=True, description="the unweighted group mean")
def clipped_mean_around(received, present: jax.Array, centres, tau: float):
    """(1/n) sum_j clip(x_j - c_i, tau) for every member i: its present mates' copies x_j
    clipped around its own centre c_i (whole-copy norms), n its group's present copies.
    received, centres: trees of (G, M, ...) leaves -> (G, M, ...). One difference at a time (a
    loop over the M ranks)."""
    count = jnp.maximum(present.sum(axis=1), 1).astype(jnp.float32)
    total = jax.tree.map(jnp.zeros_like, centres)
    for j in range(present.shape[1]):
        differences = jax.tree.map(lambda x, c, j=j: x[:, j:j + 1] - c, received, centres)
        norms = jnp.sqrt(_squared_norms(differences))  # (G, M): one per member i.
        scale = jnp.where(norms > tau, tau / jnp.maximum(norms, 1e-30), 1.0)
        weights = jnp.where(present & present[:, j:j + 1], scale, 0.0)
        total = jax.tree.map(lambda t, d, w=weights: t + present_like(w, d).astype(d.dtype) * d,
                             total, differences)
    return jax.tree.map(lambda t: t / present_like(count[:, None], t).astype(t.dtype), total)


def self_centered_clip(received, present: jax.Array, params: Params):
    """ClippedGossip's step within a group (He, Karimireddy & Jaggi 2022, with uniform weights
    1/n over the n present members): member i takes x_i + (1/n) sum_j clip(x_j - x_i, tau),
    clip(d, tau) = d min(1, tau / ||d||) with the norm over the whole copy. Per member: each
    clips its mates' copies around its own, so members of one group end apart."""
    return jax.tree.map(jnp.add, received,
                        clipped_mean_around(received, present, received, params.tau))


def centered_clip_previous(received, present: jax.Array, params: Params, previous):
    """ByzFL's CenteredClipping from its previous output, per member: member i starts from what
    it took in its last round (its initial copy at first), v <- v + (1/n) sum_j clip(x_j - v,
    tau), `params.iterations` times. Returns (values, state): both each member's v."""

    def step(_, v):
        return jax.tree.map(jnp.add, v, clipped_mean_around(received, present, v, params.tau))

    out = jax.lax.fori_loop(0, params.iterations, step,
                            jax.tree.map(lambda p, x: p.astype(x.dtype), previous, received))
    return out, out


def floating_leaves(message):
    """A copy of the message's floating leaves, None for the others: a rule state that
    remembers it (a copy: the run state's buffers are donated to the step one by one)."""
    return jax.tree.map(lambda x: jnp.copy(x) if jnp.issubdtype(x.dtype, jnp.floating) else None,
                        message)


def _at_most_two(params: Params, group_size: int) -> bool:
    """The median of one or two copies is their mean (and centered clipping from it stays
    there: two differences of equal norm and opposite sign)."""
    del params
    return group_size <= 2


def _trims_nothing(params: Params, group_size: int) -> bool:
    """trimmed_mean drops f_g = min(f, (n - 1) // 2) <= min(f, (M - 1) // 2) copies per side."""
    return min(params.f, (group_size - 1) // 2) <= 0


RULES.register("mean", MEAN)
RULES.register("median", Rule(coordinatewise(median),
                              description="the coordinate-wise median of the group",
                              mean_if=_at_most_two))
RULES.register("trimmed_mean", Rule(trimmed_mean, description="the coordinate-wise mean without "
                                    "the f largest and f smallest copies (--aggregator_f)",
                                    honest_majority=True, mean_if=_trims_nothing))
RULES.register("centered_clip", Rule(centered_clip, description="centered clipping from the "
                                     "median (--clip_tau, --clip_iterations)", clips=True,
                                     mean_if=_at_most_two))
RULES.register("krum", Rule(krum, description="the copy nearest its n - f - 1 nearest mates "
                            "(--aggregator_f)", honest_majority=True))
RULES.register("centered_clip_previous", Rule(
    centered_clip_previous, per_member=True, init=floating_leaves, clips=True,
    description="centered clipping from each member's previous output, ByzFL's start "
    "(--clip_tau, --clip_iterations)"))
RULES.register("self_centered_clip", Rule(
    self_centered_clip, per_member=True, clips=True,
    description="each member adds the mean of its mates' differences clipped to --clip_tau "
    "around its own copy (ClippedGossip)"))


def get(name: str, params: Params | None = None) -> Rule:
    """The Rule registered as `name` (ConfigError naming --aggregator if none); with `params`,
    bound to them."""
    rule = RULES.get(name)
    return rule if params is None else rule.with_params(params)
