"""Which peers are evaluated, and their test accuracy (the runner calls this on schedule)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from marfl_jax import sharding


def select_eval_peers(config, present: np.ndarray, iteration: int) -> np.ndarray | None:
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


def evaluate(config, params, present: np.ndarray, iteration: int, evaluate_peers, test_images,
             test_labels) -> dict:
    """The evaluation fields of a metrics row.

    Args:
      params: every peer's params, leaves (N, ...).
      present: (N,) bool, the peers that took part in the iteration.
      evaluate_peers: jitted (params (K, ...), images, labels) -> (accuracy (K,), loss (K,)).
    Returns:
      accuracy, loss (means over the evaluated models), accuracy_std / _min / _max and
      evaluated_peers.
    """
    peers = select_eval_peers(config, present, iteration)
    if peers is None:
        weights = present.astype(np.float32) / max(int(present.sum()), 1)
        if not present.any():
            weights = np.full(present.shape, 1.0 / present.size, np.float32)
        chosen = jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1)[None], params)
    else:
        chosen = jax.tree.map(lambda x: x[np.asarray(peers)], params)
    accuracy, loss = sharding.to_host(evaluate_peers(chosen, test_images, test_labels))
    accuracy, loss = np.asarray(accuracy), np.asarray(loss)
    return {"accuracy": float(accuracy.mean()), "loss": float(loss.mean()),
            # In float64: the float32 std of equal accuracies reads ~1e-8, not 0.
            "accuracy_std": float(accuracy.astype(np.float64).std()),
            "accuracy_min": float(accuracy.min()), "accuracy_max": float(accuracy.max()),
            "evaluated_peers": int(accuracy.size)}
