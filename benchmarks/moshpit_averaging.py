"""The Moshpit SGD paper's averaging experiment (Ryabinin et al., NeurIPS 2021, section 4.1).

N peers hold random vectors at distinct random cells of a 32x32 grid; round r averages along
grid axis r mod 2 (every line of the grid is a group). Each peer fails in each round with
probability p: a failed peer neither sends nor averages (keeps its value). A single all-reduce
group, the baseline, averages only in rounds where no peer fails. We count rounds until the mean
squared deviation of the peers from the true average falls below 1e-9 (cap 50), averaged over
restarts. Two Moshpit variants are run:
* `fixed cells`: peers stay in their cells, as the Moshpit authors' simulator does
  (`averaging_experiments/averager.py`, MoshpitAverager) — this is what their figures measure;
* `chunk keys`: after each round a peer's coordinate on the averaged axis becomes its rank in the
  group (the chunk index), the key update of the Moshpit algorithm and of MAR-FL, via
  `marfl.grid_key_rule`.

    python -m benchmarks.moshpit_averaging            # ~1 minute on a 2-core CPU
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from marfl_jax import mixing
from marfl_jax.algorithms import marfl

flags.DEFINE_list("num_peers", ["512", "768", "900"], "Peer counts N.")
flags.DEFINE_list("failure_prob", ["0", "0.01"], "Per-peer per-round failure probability p.")
flags.DEFINE_integer("restarts", 10, "Independent runs per setting.")
flags.DEFINE_integer("max_rounds", 50, "Cap on rounds.")
flags.DEFINE_integer("dim", 16, "Length of each peer's random vector.")
flags.DEFINE_float("tolerance", 1e-9, "Mean squared deviation that counts as averaged.")
FLAGS = flags.FLAGS

GRID = (32, 32)
# Ryabinin et al. 2021, Figure 3 / Table: mean rounds of Moshpit All-Reduce, p = 0 / 0.01.
PUBLISHED = {512: (8.2, 8.8), 768: (6.0, 6.9), 900: (5.0, 6.5)}


@functools.partial(jax.jit, static_argnames=("round_index", "variant"))
def averaging_round(values, keys, key, failure_prob, *, round_index, variant):
    """One round. values (N, D) float32, keys (N,) grid cells -> (values, keys)."""
    rule = marfl.grid_key_rule(GRID, np.zeros(1))
    alive = jax.random.uniform(key, keys.shape) >= failure_prob
    if variant == "all-reduce":
        ids = jnp.where(jnp.all(alive), 0, mixing.ABSENT) * jnp.ones_like(keys)
        return mixing.group_mean(values, ids, 1), keys
    ids = jnp.where(alive, rule.group_of(keys, round_index), mixing.ABSENT)
    values = mixing.group_mean(values, ids, rule.num_groups)
    if variant == "chunk keys":
        new_keys = rule.next_key(keys, mixing.rank_in_group(ids, rule.num_groups), round_index)
        keys = jnp.where(alive, new_keys, keys)
    return values, keys


def rounds_to_average(num_peers, failure_prob, seed, *, variant, max_rounds, dim, tolerance):
    """Rounds until the mean squared deviation from the true mean is below tolerance (capped)."""
    rng = np.random.default_rng(seed)
    values = jnp.asarray(rng.normal(size=(num_peers, dim)), jnp.float32)
    target = values.mean(axis=0)
    keys = jnp.asarray(rng.choice(np.prod(GRID), size=num_peers, replace=False), jnp.int32)
    key = jax.random.key(seed)
    for r in range(max_rounds):
        values, keys = averaging_round(values, keys, jax.random.fold_in(key, r), failure_prob,
                                       round_index=r % len(GRID), variant=variant)
        if float(((values - target) ** 2).mean()) < tolerance:  # Per coordinate, as scalars.
            return r + 1
    return max_rounds


def main(_):
    print(f"Moshpit All-Reduce on a {GRID[0]}x{GRID[1]} grid, {FLAGS.restarts} restarts, cap "
          f"{FLAGS.max_rounds} rounds, tolerance {FLAGS.tolerance:g}; mean rounds (published)")
    variants = ("fixed cells", "chunk keys", "all-reduce")
    print(f"{'N':>5} {'p':>5} | {'published':>9} | " + " | ".join(f"{v:>11}" for v in variants))
    for n in map(int, FLAGS.num_peers):
        for p_index, p in enumerate(map(float, FLAGS.failure_prob)):
            kwargs = dict(max_rounds=FLAGS.max_rounds, dim=FLAGS.dim, tolerance=FLAGS.tolerance)
            means = [np.mean([rounds_to_average(n, p, s, variant=v, **kwargs)
                              for s in range(FLAGS.restarts)]) for v in variants]
            published = PUBLISHED.get(n, (float("nan"),) * 2)[min(p_index, 1)]
            print(f"{n:>5} {p:>5g} | {published:>9.1f} | "
                  + " | ".join(f"{m:>11.1f}" for m in means), flush=True)


if __name__ == "__main__":
    app.run(main)
