"""The `--dataset` registry: each name -> a loader `loader(data_dir, **options) -> Dataset`.

`load_dataset` passes every loader the text options `encoder`, `features`, `feature_dim` and
`feature_cache`; the image loaders ignore them. Registering a loader in `DATASETS` makes
`load_dataset` load it:

    @DATASETS.register('my_data')
    def my_data(data_dir, **options):
        return Dataset('my_data', x_train, y_train, x_test, y_test, num_classes, 'my arrays')

A loader may say what its examples are, `my_data.inputs = 'images'` (28x28) or `'features'`
(D floats), so that `Config.validate` refuses a model that takes the other (`models.MODELS`'
factories say what they take the same way).
"""

from __future__ import annotations

from typing import Any

from marfl_jax.data import encoders, sources, text
from marfl_jax.data.common import Dataset
from marfl_jax.registry import Registry

DATASETS: Registry = Registry('dataset')


def load_dataset(name: str, data_dir: str | None = None, *, encoder: str = 'lsa',
                 features: str = '', feature_dim: int = 768,
                 feature_cache: str | None = None) -> Dataset:
    """Loads a dataset by its `--dataset` name: `DATASETS.get(name)(data_dir, **options)`.

    Args:
      name: 'mnist10k' (embedded, always offline), 'mnist' or 'fashion_mnist'; or a text corpus,
        'bbc_news' (embedded) or '20newsgroups', turned into features by `encoder` ('lsa' with
        `feature_dim` components, cached under `feature_cache`; or 'npz', the precomputed
        `features` file). See `marfl_jax.data.text` and `marfl_jax.data.encoders`. Or a name
        registered in DATASETS.
      data_dir: for 'mnist' / 'fashion_mnist': a folder holding the four standard IDX files
        (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
        `t10k-labels-idx1-ubyte`, each optionally `.gz`), or else the TFDS data directory (None:
        TFDS's default). Ignored for 'mnist10k'. With no data_dir, 'fashion_mnist' first looks in
        `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`). For
        '20newsgroups': a local copy (see `marfl_jax.data.text`).

    Returns:
      The `Dataset`.

    Raises:
      ValueError: unknown name (a registry ConfigError), or a malformed IDX file.
      DataUnavailableError: the data is neither on disk nor downloadable (offline).
    """
    loader = DATASETS.get(name)
    return loader(data_dir, encoder=encoder, features=features, feature_dim=feature_dim,
                  feature_cache=feature_cache)


def load_text_dataset(name: str, data_dir: str | None = None, *, encoder: str = 'lsa',
                      features: str = '', feature_dim: int = 768,
                      feature_cache: str | None = None) -> Dataset:
    """A text corpus as (n, D) float32 features from a frozen encoder."""
    if encoder == 'npz':
        x_train, y_train, x_test, y_test = encoders.npz_features(features)
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
        return Dataset(name, x_train, y_train, x_test, y_test, num_classes,
                       f'precomputed features {features}')
    corpus = text.load_corpus(name, data_dir)
    x_train, x_test, info = encoders.lsa_features(corpus, feature_dim, feature_cache)
    how = 'cached' if info['cache_hit'] else 'fitted'
    return Dataset(name, x_train, corpus.y_train, x_test, corpus.y_test, len(corpus.class_names),
                   f'{corpus.source}; LSA {feature_dim}-d features {how} ({info["cache"]}, fit '
                   f'{info["fit_seconds"]:.1f} s)')


@DATASETS.register('mnist10k')
def _mnist10k(data_dir: str | None, **options: Any) -> Dataset:
    del data_dir, options  # Embedded: nothing to choose.
    return sources.load_mnist10k()


@DATASETS.register('mnist')
def _mnist(data_dir: str | None, **options: Any) -> Dataset:
    del options
    return sources.load_image_dataset('mnist', data_dir)


@DATASETS.register('fashion_mnist')
def _fashion_mnist(data_dir: str | None, **options: Any) -> Dataset:
    del options
    return sources.load_image_dataset('fashion_mnist', data_dir)


@DATASETS.register('bbc_news')
def _bbc_news(data_dir: str | None, **options: Any) -> Dataset:
    return load_text_dataset('bbc_news', data_dir, **options)


@DATASETS.register('20newsgroups')
def _20newsgroups(data_dir: str | None, **options: Any) -> Dataset:
    return load_text_dataset('20newsgroups', data_dir, **options)


for _loader in (_mnist10k, _mnist, _fashion_mnist):
    _loader.inputs = 'images'
for _loader in (_bbc_news, _20newsgroups):
    _loader.inputs = 'features'
