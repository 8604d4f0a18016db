"""Splitting a training set among peers.

Peers never hold copies of the data: each holds a row of example indices into the one shared
training array, so a peer's batch is a gather `x_train[table[p, i]]`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

PARTITION_METHODS = ('iid', 'iid_shuffled', 'dirichlet')


class PeerIndex(NamedTuple):
    """Which training examples each of N peers holds.

    Attributes:
      table: (N, L) int32; row p lists peer p's example indices into the shared training array in
        its first counts[p] entries and is padded with 0 beyond (L = max(1, max(counts))).
      counts: (N,) int32 number of examples per peer (may be 0 under a Dirichlet partition).
    """

    table: np.ndarray
    counts: np.ndarray


def partition(labels: np.ndarray, num_peers: int, method: str, alpha: float = 1.0,
              seed: int = 0) -> PeerIndex:
    """Assigns every training example to exactly one peer.

    Args:
      labels: (n,) integer class labels of the shared training array.
      num_peers: N, 1 <= N <= n.
      method: 'iid': contiguous slices of floor(n/N) examples, the remainder to the last peer (as
        the paper's authors do); 'iid_shuffled': the same slices of a seeded permutation;
        'dirichlet': per class, proportions ~ Dirichlet(alpha·1_N) cut the class's shuffled
        examples among the peers (peers may get none).
      alpha: Dirichlet concentration (> 0; checked only for 'dirichlet'); small = skewed.
      seed: seed of the numpy generator ('iid_shuffled', 'dirichlet').

    Returns:
      A `PeerIndex` with table (N, L) int32 and counts (N,) int32; each peer's indices are sorted.
    """
    labels = np.asarray(labels)
    if method not in PARTITION_METHODS:
        raise ValueError(
            f'--partition={method!r} is not supported; use one of {PARTITION_METHODS}.')
    num_examples = labels.shape[0]
    if not 1 <= num_peers <= num_examples:
        raise ValueError(
            f'--num_peers={num_peers} must be between 1 and the number of training examples '
            f'({num_examples}).')
    if method == 'dirichlet' and not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f'--dirichlet_alpha={alpha} must be a finite number > 0.')

    rng = np.random.default_rng(seed)
    if method == 'iid':
        shards = _contiguous_slices(np.arange(num_examples), num_peers)
    elif method == 'iid_shuffled':
        shards = _contiguous_slices(rng.permutation(num_examples), num_peers)
    else:
        shards = _dirichlet_shards(labels, num_peers, alpha, rng)
    return _pack([np.sort(shard) for shard in shards])


def _contiguous_slices(order: np.ndarray, num_peers: int) -> list[np.ndarray]:
    """floor(n/N) consecutive entries of order per peer; the last peer also takes the remainder."""
    size = len(order) // num_peers
    starts = np.arange(num_peers) * size
    ends = np.append(starts[1:], len(order))
    return [order[start:end] for start, end in zip(starts, ends, strict=True)]


def _dirichlet_shards(labels: np.ndarray, num_peers: int, alpha: float,
                      rng: np.random.Generator) -> list[np.ndarray]:
    """Per class: shuffle its examples, cut them at the cumulative Dirichlet proportions."""
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_peers)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_peers, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for peer, piece in enumerate(np.split(members, cuts)):
            pieces[peer].append(piece)
    return [np.concatenate(peer_pieces) for peer_pieces in pieces]


def _pack(shards: list[np.ndarray]) -> PeerIndex:
    """Ragged per-peer index lists -> zero-padded (N, L) int32 table and (N,) counts."""
    counts = np.array([len(shard) for shard in shards], dtype=np.int32)
    table = np.zeros((len(shards), max(1, int(counts.max()))), dtype=np.int32)
    for peer, shard in enumerate(shards):
        table[peer, :len(shard)] = shard
    return PeerIndex(table=table, counts=counts)
