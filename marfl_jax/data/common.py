"""What every data source shares: the `Dataset` record, the unavailable-data error, the network
probe, the fixed stratified split, and the model input (`preprocess`).

Every other module of marfl_jax.data may import this one; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import threading

import jax.numpy as jnp
import numpy as np

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class DataUnavailableError(RuntimeError):
    """The requested data is not on this machine and cannot be fetched now."""


def require(module: str, requirement: str, purpose: str) -> None:
    """Raises DataUnavailableError saying what to install when an optional package (imported
    only where needed) is missing."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise DataUnavailableError(f"{purpose} needs {requirement.split('==')[0]}, which is not "
                                   f"installed: pip install {requirement} (or pip install -r "
                                   "requirements.txt -e .)")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value.
class Dataset:
    """A labelled image-classification dataset held in host memory.

    Attributes:
      name: the `--dataset` value it was loaded for.
      x_train: (n_train, H, W) uint8 pixels (H = W = 28 for every image dataset here), or
        (n_train, D) float32 features (text corpora through a frozen encoder).
      y_train: (n_train,) int32 labels in [0, num_classes).
      x_test: (n_test, H, W) uint8, or (n_test, D) float32.
      y_test: (n_test,) int32.
      num_classes: number of classes.
      source: human-readable provenance (file or TFDS directory it was read from).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str

    def __post_init__(self):
        for split, x, y in (('train', self.x_train, self.y_train),
                            ('test', self.x_test, self.y_test)):
            if not ((x.dtype == np.uint8 and x.ndim == 3) or (x.dtype == np.float32
                                                               and x.ndim == 2)):
                raise ValueError(f'x_{split} must be (n, H, W) uint8 or (n, D) float32, got '
                                 f'{x.shape} {x.dtype}')
            if y.dtype != np.int32 or y.shape != x.shape[:1]:
                raise ValueError(
                    f'y_{split} must be ({x.shape[0]},) int32, got {y.shape} {y.dtype}')


def network_available(host: str = 'storage.googleapis.com', timeout_s: float = 2.0) -> bool:
    """Whether `host` resolves within timeout_s; False at once when MARFL_OFFLINE=1.

    `socket.getaddrinfo` takes no timeout, so the lookup runs in a daemon thread that is
    abandoned if it does not answer in time.
    """
    if os.environ.get('MARFL_OFFLINE', '') == '1':
        return False
    resolved = []

    def lookup():
        try:
            resolved.append(bool(socket.getaddrinfo(host, 443)))
        except OSError:
            resolved.append(False)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(resolved and resolved[0])


def stratified_split(labels: np.ndarray, num_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits example indices into train and test, stratified by label.

    Args:
      labels: (n,) integer labels.
      num_test: exact size of the test split; each class contributes its share, rounded by
        largest remainder.
      seed: seed of the numpy generator that picks and orders the examples.

    Returns:
      (train_indices (n - num_test,), test_indices (num_test,)) int64, each in shuffled order,
      disjoint, together covering range(n).
    """
    rng = np.random.default_rng(seed)
    classes, class_counts = np.unique(labels, return_counts=True)
    quota = class_counts * num_test / len(labels)
    test_counts = np.floor(quota).astype(np.int64)
    shortfall = num_test - test_counts.sum()
    test_counts[np.argsort(-(quota - test_counts), kind='stable')[:shortfall]] += 1
    train_parts, test_parts = [], []
    for cls, n_test in zip(classes, test_counts, strict=True):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    return rng.permutation(np.concatenate(train_parts)), rng.permutation(np.concatenate(test_parts))


# ----------------------------------------------------------------------------------------------
# Model input.


def preprocess(x):
    """Model input from stored examples: images via `preprocess_images`, features as float32."""
    if x.dtype == jnp.uint8:
        return preprocess_images(x)
    return jnp.asarray(x, jnp.float32)


def preprocess_images(x):
    """uint8 pixels (..., H, W) -> float32 (..., H, W, 1), scaled to [0, 1] then standardized.

    Standardization uses the MNIST mean 0.1307 and std 0.3081 for every dataset here (Fashion-MNIST
    included). Pure jnp: use it inside jit on gathered batches.
    """
    scaled = jnp.asarray(x, jnp.float32) / 255.0
    return ((scaled - MNIST_MEAN) / MNIST_STD)[..., None]
