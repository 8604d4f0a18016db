"""Which peers are evaluated, and their test accuracy (the runner calls this on schedule).

Each distinct model is evaluated once: after exact averaging the evaluated peers often hold
bitwise-equal parameters, so peers are grouped by a fingerprint of their parameters' bits, every
member is checked bitwise against its group's first peer (a fingerprint collision never merges
two models), and only the groups' first peers are evaluated, padded to a power of two so the
compiled evaluation is reused as the number of distinct models varies.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from marfl_jax import sharding


class Settings(NamedTuple):
    """What evaluation reads (`config.settings(evaluation.Settings)`)."""

    eval_peers: str  # 'all', 'mean' or a sample size.
    seed: int

    @property
    def eval_peer_count(self) -> int | None:
        """None for 'all'/'mean', else the sample size."""
        return None if self.eval_peers in ("all", "mean") else int(self.eval_peers)


def select_eval_peers(config: Settings, present: np.ndarray, iteration: int
                      ) -> np.ndarray | None:
    """Indices of the peers evaluated at `iteration`: all present peers, or a seeded sample of
    `eval_peers` of them (every peer when none is present). None means the consensus (mean)
    model of the present peers. present: (N,) bool."""
    if config.eval_peers == "mean":
        return None
    candidates = np.flatnonzero(present)
    if candidates.size == 0:
        candidates = np.arange(present.size)
    k = config.eval_peer_count
    if k is None or k >= candidates.size:
        return candidates
    rng = np.random.default_rng([config.seed, 1, iteration])
    return np.sort(rng.choice(candidates, size=k, replace=False))


def _bits(x: jax.Array) -> jax.Array:
    """(K, ...) -> (K, P) uint32 (or wider) views of each peer's values' bits."""
    x = x.reshape(x.shape[0], -1)
    if x.dtype.itemsize == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return x.astype(jnp.uint32)


@jax.jit
def fingerprints(params, peers: jax.Array) -> jax.Array:
    """(K, 2) uint32 fingerprints of the peers' parameter bits (equal models, equal prints)."""
    total = jnp.zeros((peers.shape[0], 2), jnp.uint32)
    for leaf in jax.tree.leaves(params):
        bits = _bits(leaf[peers])
        weights = (jnp.arange(bits.shape[1], dtype=jnp.uint32) * jnp.uint32(2654435761)
                   + jnp.uint32(1))
        total = total + jnp.stack([bits.sum(axis=1), (bits * weights).sum(axis=1)], axis=1)
    return total


@jax.jit
def equal_to(params, peers: jax.Array, representatives: jax.Array) -> jax.Array:
    """(K,) bool: peer k's parameters are bitwise those of representatives[k]."""
    same = jnp.ones(peers.shape[0], bool)
    for leaf in jax.tree.leaves(params):
        same = same & jnp.all(_bits(leaf[peers]) == _bits(leaf[representatives]), axis=1)
    return same


def distinct_models(params, peers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groups the peers by bitwise-equal parameters.

    Args:
      params: leaves (N, ...).
      peers: (K,) indices.
    Returns:
      (representatives (U,) peer indices, inverse (K,) in [0, U)): peers[k] holds the model of
      representatives[inverse[k]].
    """
    # Padded to a power of two, like the evaluation, so varying counts reuse a few compilations.
    padded = jnp.asarray(_padded(peers))
    prints = np.asarray(sharding.to_host(fingerprints(params, padded)))[:peers.size]
    _, first, inverse = np.unique(prints, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # Groups in order of their first peer.
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    first, inverse = first[order], rank[inverse.reshape(-1)]
    candidates = peers[first][inverse]
    same = np.asarray(sharding.to_host(equal_to(params, padded,
                                                jnp.asarray(_padded(candidates)))))[:peers.size]
    if not same.all():  # A fingerprint collision: evaluate every peer on its own.
        return peers, np.arange(peers.size)
    return peers[first], inverse


def _padded(indices: np.ndarray) -> np.ndarray:
    """indices padded with their first entry to the next power of two."""
    size = 1 << max(0, int(indices.size - 1).bit_length())
    return np.concatenate([indices, np.full(size - indices.size, indices[0], indices.dtype)])


def evaluate(config: Settings, params, present: np.ndarray, iteration: int, evaluate_peers,
             test_images, test_labels) -> dict:
    """The evaluation fields of a metrics row.

    Args:
      params: every peer's params, leaves (N, ...).
      present: (N,) bool, the peers that took part in the iteration.
      evaluate_peers: jitted (params (K, ...), images, labels) -> (accuracy (K,), loss (K,)).
    Returns:
      accuracy, loss (means over the evaluated peers), accuracy_std / _min / _max and
      evaluated_peers (the peers, not the distinct models).
    """
    peers = select_eval_peers(config, present, iteration)
    if peers is None:
        weights = present.astype(np.float32) / max(int(present.sum()), 1)
        if not present.any():
            weights = np.full(present.shape, 1.0 / present.size, np.float32)
        chosen = jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1)[None], params)
        inverse = np.zeros(1, np.int64)
    else:
        representatives, inverse = distinct_models(params, peers)
        chosen = jax.tree.map(lambda x: x[jnp.asarray(_padded(representatives))], params)
    accuracy, loss = sharding.to_host(evaluate_peers(chosen, test_images, test_labels))
    accuracy, loss = np.asarray(accuracy)[inverse], np.asarray(loss)[inverse]
    return {"accuracy": float(accuracy.mean()), "loss": float(loss.mean()),
            # In float64: the float32 std of equal accuracies reads ~1e-8, not 0.
            "accuracy_std": float(accuracy.astype(np.float64).std()),
            "accuracy_min": float(accuracy.min()), "accuracy_max": float(accuracy.max()),
            "evaluated_peers": int(accuracy.size)}
