"""Splitting a training set among peers.

Peers never hold copies of the data: each holds a row of example indices into the one shared
training array, so a peer's batch is a gather `x_train[table[p, i]]`. `PARTITIONS` maps each
`--partition` name to `fn(labels, num_peers, *, alpha, seed) -> PeerIndex`; registering one
makes `partition` use it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from marfl_jax.registry import Registry


class PeerIndex(NamedTuple):
    """Which training examples each of N peers holds.

    Attributes:
      table: (N, L) int32; row p lists peer p's example indices into the shared training array in
        its first counts[p] entries and is padded with 0 beyond (L = max(1, max(counts))).
      counts: (N,) int32 number of examples per peer (may be 0 under a Dirichlet partition).
    """

    table: np.ndarray
    counts: np.ndarray


PARTITIONS: Registry = Registry('partition')


def partition(labels: np.ndarray, num_peers: int, method: str, alpha: float = 1.0,
              seed: int = 0) -> PeerIndex:
    """Assigns every training example to exactly one peer: `PARTITIONS.get(method)(...)`.

    Args:
      labels: (n,) integer class labels of the shared training array.
      num_peers: N, 1 <= N <= n.
      method: 'iid': contiguous slices of floor(n/N) examples, the remainder to the last peer (as
        the paper's authors do); 'iid_shuffled': the same slices of a seeded permutation;
        'dirichlet': per class, proportions ~ Dirichlet(alpha·1_N) cut the class's shuffled
        examples among the peers (peers may get none); or a name registered in PARTITIONS.
      alpha: Dirichlet concentration (> 0; checked only for 'dirichlet'); small = skewed.
      seed: seed of the numpy generator ('iid_shuffled', 'dirichlet').

    Returns:
      A `PeerIndex` with table (N, L) int32 and counts (N,) int32; each peer's indices are sorted.
    """
    labels = np.asarray(labels)
    fn = PARTITIONS.get(method)
    num_examples = labels.shape[0]
    if not 1 <= num_peers <= num_examples:
        raise ValueError(
            f'--num_peers={num_peers} must be between 1 and the number of training examples '
            f'({num_examples}).')
    return fn(labels, num_peers, alpha=alpha, seed=seed)


@PARTITIONS.register('iid')
def iid(labels: np.ndarray, num_peers: int, *, alpha: float, seed: int) -> PeerIndex:
    """Contiguous slices of floor(n/N) examples, the remainder to the last peer."""
    del alpha, seed
    return _pack(_contiguous_slices(np.arange(labels.shape[0]), num_peers))


@PARTITIONS.register('iid_shuffled')
def iid_shuffled(labels: np.ndarray, num_peers: int, *, alpha: float, seed: int) -> PeerIndex:
    """The `iid` slices of a permutation drawn with `np.random.default_rng(seed)`."""
    del alpha
    order = np.random.default_rng(seed).permutation(labels.shape[0])
    return _pack(_contiguous_slices(order, num_peers))


@PARTITIONS.register('dirichlet')
def dirichlet(labels: np.ndarray, num_peers: int, *, alpha: float, seed: int) -> PeerIndex:
    """Per class, Dirichlet(alpha·1_N) proportions of its shuffled examples to the peers."""
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f'--dirichlet_alpha={alpha} must be a finite number > 0.')
    return _pack(_dirichlet_shards(labels, num_peers, alpha, np.random.default_rng(seed)))


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
    """Ragged per-peer index lists -> zero-padded (N, L) int32 table (rows sorted), (N,) counts."""
    counts = np.array([len(shard) for shard in shards], dtype=np.int32)
    table = np.zeros((len(shards), max(1, int(counts.max()))), dtype=np.int32)
    for peer, shard in enumerate(shards):
        table[peer, :len(shard)] = np.sort(shard)
    return PeerIndex(table=table, counts=counts)
