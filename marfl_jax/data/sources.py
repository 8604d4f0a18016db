"""Where the images come from: the embedded MNIST subset, local IDX files, or TFDS.

Every loader returns a `Dataset` of raw uint8 pixels and int32 labels; `common.preprocess_images`
turns pixels into the float32 model input (it runs on the accelerator, inside jit). The registry
of `--dataset` names is `marfl_jax.data.datasets`.

Nothing here may hang on a machine without network access: the TFDS path checks for the network
(`network_available`) before it would download, and fails within seconds with a message naming the
offline alternatives.
"""

from __future__ import annotations

import gzip
import importlib.resources
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from marfl_jax.data.common import (
    Dataset,
    DataUnavailableError,
    network_available,
    require,
    stratified_split,
)

NUM_CLASSES = 10

# Seed of the embedded subset's train/test split. It is a constant of the project, independent of
# any run's --seed, so every run (and every paper-reproduction number) sees the same split.
MNIST10K_SPLIT_SEED = 20_251_205
MNIST10K_NUM_TEST = 2_000

# Hosts TFDS downloads from (tensorflow_datasets/image_classification/mnist.py).
_DOWNLOAD_HOSTS = {
    'mnist': 'storage.googleapis.com',
    'fashion_mnist': 'fashion-mnist.s3-website.eu-central-1.amazonaws.com',
}
# Where the Debian package `dataset-fashion-mnist` installs the original IDX .gz files.
DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'

_IDX_STEMS = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}
_IDX_UBYTE = 0x08


def load_image_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """'mnist' or 'fashion_mnist' from local IDX files, else from TFDS.

    Args:
      name: 'mnist' or 'fashion_mnist'.
      data_dir: a folder holding the four standard IDX files (`train-images-idx3-ubyte`,
        `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each
        optionally `.gz`), or else the TFDS data directory (None: TFDS's default). With no
        data_dir, 'fashion_mnist' first looks in `/usr/share/datasets/fashion-mnist` (Debian's
        `dataset-fashion-mnist`).

    Raises:
      ValueError: a malformed IDX file.
      DataUnavailableError: the data is neither on disk nor downloadable (offline).
    """
    if data_dir is None and name == 'fashion_mnist' and _find_idx_files(DEBIAN_FASHION_MNIST_DIR):
        data_dir = DEBIAN_FASHION_MNIST_DIR
    if data_dir is not None and _find_idx_files(data_dir):
        return load_idx_dataset(name, data_dir)
    return load_tfds_dataset(name, data_dir)


# ----------------------------------------------------------------------------------------------
# Embedded MNIST subset.


def load_mnist10k() -> Dataset:
    """The embedded 10,000 real MNIST digits, split 8,000 train / 2,000 test.

    The split is stratified by class and fixed: per class, the examples are permuted with
    `np.random.default_rng(MNIST10K_SPLIT_SEED)` and the first ones go to test, the number per class
    apportioned from 2,000 by largest remainder (≈ 20 % of each class). The file stores the digits
    sorted by class, so both splits are then shuffled with the same generator; contiguous (`iid`)
    partitions of the training set are therefore class-balanced. The split never depends on a run's
    `--seed`. Provenance and licence: MNIST10K.md next to this module.
    """
    resource = importlib.resources.files(__package__).joinpath('mnist10k.npz')
    with resource.open('rb') as f, np.load(f) as arrays:
        images, labels = arrays['x'], arrays['y'].astype(np.int32)
    train_idx, test_idx = stratified_split(labels, MNIST10K_NUM_TEST, MNIST10K_SPLIT_SEED)
    return Dataset(
        name='mnist10k',
        x_train=images[train_idx], y_train=labels[train_idx],
        x_test=images[test_idx], y_test=labels[test_idx],
        num_classes=NUM_CLASSES,
        source=f'embedded marfl_jax/data/mnist10k.npz (MNIST subset, CC BY-SA 3.0), '
               f'fixed stratified split seed {MNIST10K_SPLIT_SEED}',
    )


# ----------------------------------------------------------------------------------------------
# Local IDX files (the original MNIST / Fashion-MNIST distribution format).


def _find_idx_files(data_dir: str) -> dict[str, str]:
    """Paths of the four IDX files in data_dir: {} if none is there; raises if only some are."""
    found = {}
    for role, stem in _IDX_STEMS.items():
        # Some redistributions write `train-images.idx3-ubyte` (dot instead of dash).
        alt_stem = stem.replace('-idx', '.idx')
        for candidate in (stem, stem + '.gz', alt_stem, alt_stem + '.gz'):
            path = os.path.join(data_dir, candidate)
            if os.path.isfile(path):
                found[role] = path
                break
    if found and len(found) < len(_IDX_STEMS):
        missing = [_IDX_STEMS[role] for role in _IDX_STEMS if role not in found]
        raise DataUnavailableError(
            f'--data_dir={data_dir} holds only some of the IDX files; missing: {missing} '
            '(each may also be gzipped, ending in .gz).')
    return found


def read_idx(path: str, expected_ndim: int) -> np.ndarray:
    """Reads one IDX file of unsigned bytes (optionally gzipped).

    IDX layout: 2 zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions,
    one big-endian uint32 per dimension, then the data in C order.

    Args:
      path: the file; a name ending in `.gz` is decompressed.
      expected_ndim: 3 for images (magic 0x00000803), 1 for labels (magic 0x00000801).

    Returns:
      uint8 array of the stored shape, e.g. (n, 28, 28) or (n,).

    Raises:
      ValueError: the file is not such an IDX file (wrong magic number, truncated, bad gzip).
    """
    try:
        opener = gzip.open if path.endswith('.gz') else open
        with opener(path, 'rb') as f:
            content = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f'cannot read IDX file {path}: {err}') from err
    expected_magic = (_IDX_UBYTE << 8) | expected_ndim
    magic = int.from_bytes(content[:4], 'big') if len(content) >= 4 else None
    if magic != expected_magic:
        shown = 'none (file shorter than 4 bytes)' if magic is None else f'0x{magic:08x}'
        raise ValueError(
            f'{path} is not an IDX file of unsigned bytes with {expected_ndim} dimension(s): '
            f'magic number {shown}, expected 0x{expected_magic:08x}.')
    header_size = 4 + 4 * expected_ndim
    if len(content) < header_size:
        raise ValueError(f'{path}: truncated IDX header.')
    shape = struct.unpack(f'>{expected_ndim}I', content[4:header_size])
    payload = memoryview(content)[header_size:]
    if len(payload) != int(np.prod(shape)):
        raise ValueError(
            f'{path}: IDX header announces shape {shape} ({int(np.prod(shape))} bytes) but '
            f'{len(payload)} data bytes follow.')
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def load_idx_dataset(name: str, data_dir: str) -> Dataset:
    """The train and test splits in the four IDX files of data_dir (see `load_image_dataset`)."""
    paths = _find_idx_files(data_dir)
    if not paths:
        raise DataUnavailableError(f'no IDX files in --data_dir={data_dir}.')
    arrays = {}
    for split in ('train', 'test'):
        images = read_idx(paths[f'{split}_images'], expected_ndim=3)
        labels = read_idx(paths[f'{split}_labels'], expected_ndim=1)
        if len(images) != len(labels):
            raise ValueError(f'{data_dir}: {len(images)} {split} images but {len(labels)} labels.')
        arrays[split] = images, _checked_labels(labels, paths[f'{split}_labels'])
    return Dataset(
        name=name,
        x_train=arrays['train'][0], y_train=arrays['train'][1],
        x_test=arrays['test'][0], y_test=arrays['test'][1],
        num_classes=NUM_CLASSES,
        source=f'IDX files in {os.path.abspath(data_dir)}',
    )


def _checked_labels(labels: np.ndarray, where: str) -> np.ndarray:
    labels = labels.astype(np.int32)
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f'{where}: label {labels.max()} outside [0, {NUM_CLASSES}).')
    return labels


# ----------------------------------------------------------------------------------------------
# TensorFlow Datasets (array_record format, read without TensorFlow).


def _offline_alternatives(name: str) -> str:
    lines = [
        '  --dataset=mnist10k  (10,000 real MNIST digits embedded in the package; works offline)',
        '  --data_dir=FOLDER   (a folder with train-images-idx3-ubyte, train-labels-idx1-ubyte, '
        't10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally .gz)',
    ]
    if name == 'fashion_mnist':
        lines.append(
            '  apt-get install dataset-fashion-mnist, then '
            f'--data_dir={DEBIAN_FASHION_MNIST_DIR}')
    return 'Alternatives:\n' + '\n'.join(lines)


def load_tfds_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """Reads a TFDS dataset ('mnist' or 'fashion_mnist'), preparing it first when online.

    Reading uses `builder.as_data_source` (array_record; no TensorFlow needed) with the images left
    PNG-encoded and decoded here, so neither OpenCV nor PIL is needed either.

    Raises:
      DataUnavailableError: not prepared in data_dir and no network (never waits for TFDS's
        download retries), or the download / preparation failed.
    """
    try:
        require('tensorflow_datasets', 'tensorflow-datasets==4.9.10 importlib_resources',
                f'--dataset={name} without IDX files in --data_dir (read through TFDS)')
    except DataUnavailableError as err:
        raise DataUnavailableError(f'{err}\n{_offline_alternatives(name)}') from None
    import tensorflow_datasets as tfds  # Slow import; only this path needs it.

    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
        where = f'TFDS {name} is not prepared in {builder.data_dir}'
        if not network_available(_DOWNLOAD_HOSTS[name]):
            raise DataUnavailableError(
                f'{where} and this machine is offline (or MARFL_OFFLINE=1), so it cannot be '
                f'downloaded.\n{_offline_alternatives(name)}')
        try:
            builder.download_and_prepare()
        except Exception as err:  # Any download or preparation failure means: no data here.
            raise DataUnavailableError(
                f'{where} and downloading / preparing it failed ({type(err).__name__}: {err}). '
                f'Preparing needs TensorFlow installed.\n{_offline_alternatives(name)}') from err
    sources = builder.as_data_source(
        split=['train', 'test'], decoders={'image': tfds.decode.SkipDecoding()})
    arrays = {}
    for split, source in zip(('train', 'test'), sources, strict=True):
        records = source.__getitems__(range(len(source)))  # one batched read
        images = decode_gray_pngs([record['image'] for record in records])
        labels = np.array([record['label'] for record in records], dtype=np.int64)
        arrays[split] = images, _checked_labels(labels, f'TFDS {name} {split}')
    return Dataset(
        name=name,
        x_train=arrays['train'][0], y_train=arrays['train'][1],
        x_test=arrays['test'][0], y_test=arrays['test'][1],
        num_classes=builder.info.features['label'].num_classes,
        source=f'TFDS {name} {builder.version} (array_record) in {builder.data_dir}',
    )


def decode_gray_pngs(blobs: Sequence[bytes]) -> np.ndarray:
    """Decodes equally sized 8-bit grayscale, non-interlaced PNGs: (n,) bytes -> (n, H, W) uint8.

    The PNG row filters (none, sub, up, average, paeth) are undone one row at a time for all
    images at once, so the cost is O(H·W) numpy operations rather than O(n·H·W) Python steps.
    """
    shape = None
    rows = []
    for i, blob in enumerate(blobs):
        height, width, idat = _parse_gray_png(blob, i)
        if shape is None:
            shape = (height, width)
        elif shape != (height, width):
            raise ValueError(f'PNG {i} is {height}x{width}, the first one {shape[0]}x{shape[1]}.')
        rows.append(zlib.decompress(idat))
    if shape is None:
        return np.zeros((0, 0, 0), np.uint8)
    height, width = shape
    raw = np.frombuffer(b''.join(rows), np.uint8).reshape(len(blobs), height, width + 1)
    filters, filtered = raw[:, :, 0], raw[:, :, 1:].astype(np.int32)
    if filters.max() > 4:
        raise ValueError(f'PNG row filter type {filters.max()} is not defined.')
    image = np.zeros((len(blobs), height, width), np.int32)
    above = np.zeros((len(blobs), width), np.int32)
    for r in range(height):
        row, kind = filtered[:, r], filters[:, r]
        out = np.where(kind[:, None] == 2, row + above, row)  # none / up
        sub = kind == 1
        out[sub] = np.cumsum(row[sub], axis=1)
        for code in (3, 4):
            sel = np.flatnonzero(kind == code)
            if sel.size:
                out[sel] = _unfilter_sequential(row[sel], above[sel], code)
        image[:, r] = out & 0xFF
        above = image[:, r]
    return image.astype(np.uint8)


def _unfilter_sequential(row: np.ndarray, above: np.ndarray, code: int) -> np.ndarray:
    """Undoes the PNG average (3) or paeth (4) filter on (k, W) rows (bytes per pixel = 1)."""
    out = np.zeros_like(row)
    left = np.zeros(row.shape[0], np.int32)
    upper_left = np.zeros(row.shape[0], np.int32)
    for x in range(row.shape[1]):
        up = above[:, x]
        if code == 3:
            predictor = (left + up) // 2
        else:
            estimate = left + up - upper_left
            dist_left, dist_up = np.abs(estimate - left), np.abs(estimate - up)
            dist_upper_left = np.abs(estimate - upper_left)
            predictor = np.where(
                (dist_left <= dist_up) & (dist_left <= dist_upper_left), left,
                np.where(dist_up <= dist_upper_left, up, upper_left))
        out[:, x] = (row[:, x] + predictor) & 0xFF
        left, upper_left = out[:, x], up
    return out


def _parse_gray_png(blob: bytes, index: int) -> tuple[int, int, bytes]:
    """(height, width, concatenated IDAT data) of one 8-bit grayscale PNG."""
    if blob[:8] != b'\x89PNG\r\n\x1a\n':
        raise ValueError(f'image {index} is not a PNG.')
    pos, header, idat = 8, None, []
    while pos + 8 <= len(blob):
        length, kind = struct.unpack('>I4s', blob[pos:pos + 8])
        data = blob[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b'IHDR':
            header = struct.unpack('>IIBBBBB', data)
        elif kind == b'IDAT':
            idat.append(data)
        elif kind == b'IEND':
            break
    if header is None:
        raise ValueError(f'PNG {index} has no IHDR chunk.')
    width, height, bit_depth, color_type, _, _, interlace = header
    if (bit_depth, color_type, interlace) != (8, 0, 0):
        raise ValueError(
            f'PNG {index}: only 8-bit grayscale non-interlaced PNGs are supported, got bit depth '
            f'{bit_depth}, color type {color_type}, interlace {interlace}.')
    return height, width, b''.join(idat)
