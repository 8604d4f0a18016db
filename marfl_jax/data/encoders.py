"""Frozen text encoders: documents -> fixed feature vectors, computed once and cached on disk.

* `lsa` (default): TF-IDF (sublinear tf, English stop words, terms in >= 2 documents and <= 50 %
  of them) and truncated SVD to `dim` = 768 components, both fitted on the training split only;
  rows are then L2-normalized and every component standardized with the training split's mean
  and std. 768 dimensions give the paper's head its exact shape (56,828 parameters for 20
  classes). A corpus too small for 768 components gets as many as it supports, zero-padded.
* `npz`: precomputed features from any model, `--features=PATH.npz` with arrays `x_train`
  (n_train, D) float, `y_train` (n_train,) int, `x_test`, `y_test`. The paper's encoder, for
  example: DistilBERT's [CLS] vector (`last_hidden_state[:, 0]`, D = 768) of each document
  tokenized to 128 tokens, computed once with Hugging Face `transformers` and saved with
  `np.savez(PATH, x_train=..., y_train=..., x_test=..., y_test=...)`.

The LSA cache file is keyed by the corpus's name, a digest of its texts and labels, and the
encoder's settings, under `--feature_cache` (default `$MARFL_CACHE` or `~/.cache/marfl_jax`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np

from marfl_jax.data.common import require
from marfl_jax.data.text import TextCorpus

ENCODERS = ("lsa", "npz")
LSA_SETTINGS = {"sublinear_tf": True, "stop_words": "english", "min_df": 2, "max_df": 0.5,
                "svd_seed": 0, "version": 1}


def default_cache_dir() -> str:
    return os.environ.get("MARFL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "marfl_jax")


def corpus_digest(corpus: TextCorpus) -> str:
    """sha256 over the corpus's texts and labels, in order."""
    digest = hashlib.sha256()
    for texts, labels in ((corpus.train_texts, corpus.y_train),
                          (corpus.test_texts, corpus.y_test)):
        for text in texts:
            digest.update(text.encode("utf-8", errors="replace"))
            digest.update(b"\0")
        digest.update(np.asarray(labels, np.int32).tobytes())
    return digest.hexdigest()


def lsa_cache_path(corpus: TextCorpus, dim: int, cache_dir: str) -> str:
    key = json.dumps({"corpus": corpus.name, "digest": corpus_digest(corpus), "dim": dim,
                      **LSA_SETTINGS}, sort_keys=True)
    name = f"{corpus.name}-lsa{dim}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    return os.path.join(cache_dir, name)


def fit_lsa(train_texts: list[str], test_texts: list[str], dim: int):
    """Fits TF-IDF + truncated SVD on the training texts only; returns (x_train, x_test) float32
    (n, dim) and the fit's seconds."""
    require("sklearn", "scikit-learn==1.9.1", "--encoder=lsa (TF-IDF + SVD)")
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    start = time.perf_counter()
    settings = LSA_SETTINGS
    min_df = settings["min_df"] if len(train_texts) >= 10 else 1  # Tiny corpora keep rare terms.
    tfidf = TfidfVectorizer(sublinear_tf=settings["sublinear_tf"],
                            stop_words=settings["stop_words"], min_df=min_df,
                            max_df=settings["max_df"] if len(train_texts) >= 10 else 1.0)
    train = tfidf.fit_transform(train_texts)
    test = tfidf.transform(test_texts)
    components = min(dim, train.shape[0] - 1, train.shape[1] - 1)
    if components < 1:
        raise ValueError(f"the training split ({train.shape[0]} documents, {train.shape[1]} "
                         "terms) is too small for LSA")
    svd = TruncatedSVD(n_components=components, random_state=settings["svd_seed"])
    x_train, x_test = svd.fit_transform(train), svd.transform(test)
    x_train, x_test = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                       for x in (x_train, x_test))
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    pad = [(0, 0), (0, dim - components)]
    x_train, x_test = (np.pad((x - mean) / std, pad).astype(np.float32)
                       for x in (x_train, x_test))
    return x_train, x_test, time.perf_counter() - start


def lsa_features(corpus: TextCorpus, dim: int = 768, cache_dir: str | None = None):
    """The corpus's LSA features, from the cache when present. Returns (x_train, x_test,
    info) with info = {"cache": path, "cache_hit": bool, "fit_seconds": float}."""
    path = lsa_cache_path(corpus, dim, cache_dir or default_cache_dir())
    if os.path.exists(path):
        with np.load(path) as arrays:
            return arrays["x_train"], arrays["x_test"], {
                "cache": path, "cache_hit": True, "fit_seconds": float(arrays["fit_seconds"])}
    x_train, x_test, seconds = fit_lsa(corpus.train_texts, corpus.test_texts, dim)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp.npz"  # Written whole, then renamed: never half a file.
    np.savez(partial, x_train=x_train, x_test=x_test, fit_seconds=seconds)
    os.replace(partial, path)
    logging.info("LSA features of %s fitted in %.1f s, cached at %s", corpus.name, seconds, path)
    return x_train, x_test, {"cache": path, "cache_hit": False, "fit_seconds": seconds}


def npz_features(path: str):
    """Precomputed features: (x_train, y_train, x_test, y_test) from an .npz (see module doc)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--features={path}: no such file")
    with np.load(path) as arrays:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
        if missing:
            raise ValueError(f"--features={path} lacks arrays: {', '.join(missing)}")
        x_train, x_test = (np.asarray(arrays[k], np.float32) for k in ("x_train", "x_test"))
        y_train, y_test = (np.asarray(arrays[k], np.int32) for k in ("y_train", "y_test"))
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"--features={path}: x_train and x_test must be (n, D) with one D, got "
                         f"{x_train.shape} and {x_test.shape}")
    if y_train.shape != x_train.shape[:1] or y_test.shape != x_test.shape[:1]:
        raise ValueError(f"--features={path}: labels must have one entry per row")
    return x_train, y_train, x_test, y_test
