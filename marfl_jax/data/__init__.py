"""Data: sources (embedded, local IDX files, TFDS; text corpora through frozen encoders),
partitioning among peers, per-peer sampling."""

from marfl_jax.data.partitions import PeerIndex, partition
from marfl_jax.data.sampling import sample_batches, sample_peer_batches
from marfl_jax.data.sources import (
    Dataset,
    DataUnavailableError,
    load_dataset,
    preprocess,
    preprocess_images,
)

__all__ = [
    'Dataset',
    'DataUnavailableError',
    'PeerIndex',
    'load_dataset',
    'partition',
    'preprocess',
    'preprocess_images',
    'sample_batches',
    'sample_peer_batches',
]
