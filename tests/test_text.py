"""Tests of the text task: corpora (a tiny synthetic 20news-bydate copy, the embedded BBC News),
the LSA encoder and its cache, precomputed features, the paper's head, and a MAR-FL run."""

import dataclasses
import os
import subprocess
import sys
import tarfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marfl_jax import models, runner
from marfl_jax.config import Config, ConfigError
from marfl_jax.data import DataUnavailableError, encoders, load_dataset, text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = {
    "rec.autos": "car engine wheel brake tire gear fuel road drive motor",
    "sci.space": "orbit rocket launch moon planet star nasa shuttle satellite comet",
    "talk.politics": "vote senate law president policy congress tax election party court",
}


def _write_bydate(root, docs_per_class=(12, 6), seed=0):
    """A tiny corpus in the 20news-bydate layout, with newsgroup headers and quoted lines."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("20news-bydate-train", "20news-bydate-test"), docs_per_class,
                            strict=True):
        for topic, words in TOPICS.items():
            folder = root / split / topic
            folder.mkdir(parents=True)
            for i in range(count):
                body = " ".join(rng.choice(words.split(), size=30))
                (folder / f"{1000 + i}").write_text(
                    f"From: someone@example.com\nSubject: note {i}\n\n{body}\n"
                    f"> quoted SECRETWORD line\n")
    return root


@pytest.fixture(scope="module")
def bydate(tmp_path_factory):
    return _write_bydate(tmp_path_factory.mktemp("news"))


class TestCorpora:

    def test_bydate_folder_and_archive_read_the_same_stripped_corpus(self, bydate, tmp_path):
        corpus = text.load_20newsgroups(str(bydate))
        assert corpus.class_names == tuple(sorted(TOPICS))
        assert len(corpus.train_texts) == 36 and len(corpus.test_texts) == 18
        np.testing.assert_array_equal(np.bincount(corpus.y_train), [12, 12, 12])
        assert not any("From:" in t or "SECRETWORD" in t for t in corpus.train_texts)
        archive = tmp_path / "20news-bydate.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for split in ("20news-bydate-train", "20news-bydate-test"):
                tar.add(bydate / split, arcname=split)
        from_archive = text.load_20newsgroups(str(tmp_path))
        assert from_archive.train_texts == corpus.train_texts
        np.testing.assert_array_equal(from_archive.y_test, corpus.y_test)

    def test_missing_20newsgroups_fails_fast_with_what_to_do(self, tmp_path, monkeypatch):
        monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "empty"))
        start = time.time()
        with pytest.raises(DataUnavailableError, match="--data_dir=PATH.*--dataset=bbc_news"):
            text.load_20newsgroups(None)
        with pytest.raises(DataUnavailableError, match="holds no 20 Newsgroups copy"):
            text.load_20newsgroups(str(tmp_path))
        assert time.time() - start < 10

    def test_bbc_news_is_embedded_with_a_fixed_split(self):
        corpus = text.load_bbc_news()
        assert corpus.class_names == ("business", "entertainment", "politics", "sports", "tech")
        assert (len(corpus.train_texts), len(corpus.test_texts)) == (1780, 445)
        np.testing.assert_array_equal(np.bincount(corpus.y_test), [102, 77, 84, 102, 80])
        assert text.load_bbc_news().test_texts[:3] == corpus.test_texts[:3]


class TestEncoder:

    def test_shape_padding_and_train_only_fitting(self, bydate):
        corpus = text.load_20newsgroups(str(bydate))
        x_train, x_test, _ = encoders.fit_lsa(corpus.train_texts, corpus.test_texts, 64)
        assert x_train.shape == (36, 64) and x_test.shape == (18, 64)
        assert x_train.dtype == np.float32
        assert np.all(x_train[:, 35:] == 0)  # Only 35 components exist: zero-padded to 64.
        # Other test documents (with unseen words) change nothing fitted on the training split.
        other = ["zeppelin quasar " * 20] * 18
        again, _, _ = encoders.fit_lsa(corpus.train_texts, other, 64)
        np.testing.assert_array_equal(again, x_train)

    def test_second_call_hits_the_cache(self, bydate, tmp_path, monkeypatch):
        corpus = text.load_20newsgroups(str(bydate))
        first = encoders.lsa_features(corpus, 16, str(tmp_path))
        assert not first[2]["cache_hit"] and os.path.exists(first[2]["cache"])

        def refuse(*args):
            raise AssertionError("fitted again despite the cache")

        monkeypatch.setattr(encoders, "fit_lsa", refuse)
        second = encoders.lsa_features(corpus, 16, str(tmp_path))
        assert second[2]["cache_hit"] and second[2]["cache"] == first[2]["cache"]
        np.testing.assert_array_equal(second[0], first[0])
        other = dataclasses.replace(corpus, y_test=corpus.y_test[::-1].copy())
        assert encoders.lsa_cache_path(other, 16, str(tmp_path)) != first[2]["cache"]

    def test_precomputed_features(self, tmp_path):
        path = tmp_path / "cls.npz"
        np.savez(path, x_train=np.ones((6, 8)), y_train=np.arange(6) % 3,
                 x_test=np.zeros((2, 8)), y_test=np.array([0, 4]))
        dataset = load_dataset("20newsgroups", encoder="npz", features=str(path))
        assert dataset.x_train.shape == (6, 8) and dataset.num_classes == 5
        np.savez(path, x_train=np.ones((6, 8)), y_train=np.arange(6))
        with pytest.raises(ValueError, match="lacks arrays: x_test, y_test"):
            load_dataset("20newsgroups", encoder="npz", features=str(path))


class TestHead:

    def test_paper_parameter_count_and_dropout_only_in_training(self):
        head = models.get_model("text_head", 20)
        x = jnp.ones((4, 768))
        params = head.init(jax.random.key(0), x)["params"]
        assert models.count_params(params) == 56_828
        evaluation = head.apply({"params": params}, x)
        np.testing.assert_array_equal(evaluation, head.apply({"params": params}, x))
        a, b = (head.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(k)})
                for k in (1, 2))
        assert not np.allclose(a, b) and not np.allclose(a, evaluation)
        assert models.uses_dropout(head) and not models.uses_dropout(models.get_model("mlp", 10))


@pytest.mark.slow
def test_mar_fl_runs_on_text_features(bydate, tmp_path):
    config = Config(dataset="20newsgroups", data_dir=str(bydate), model="text_head",
                    feature_dim=16, feature_cache=str(tmp_path / "cache"), num_peers=4,
                    group_size=2, key_dim=2, batch_size=4, local_batches=2, eval_every=2,
                    eval_peers="all", max_iterations=6, target_accuracy=1.0, checkpoint_every=0,
                    mkd=True, mkd_iterations=2, mkd_batches=1)
    rows = runner.run(config, str(tmp_path / "run")).metrics
    payload = 4 * (16 * 72 + 72 + 72 * 3 + 3)
    assert rows[-1]["bytes"] == 4 * 2 * 1 * 2 * payload  # N * G * (M - 1) * 2S.
    assert rows[-1]["accuracy"] > 0.5  # Three well-separated topics.
    assert rows[0]["distilled_peers"] == 4


def test_config_pairs_models_with_inputs():
    with pytest.raises(ConfigError, match="--model=cnn is not allowed with --dataset=bbc_news"):
        Config(dataset="bbc_news").validate()
    with pytest.raises(ConfigError, match="--model=text_head is not allowed with "
                                          "--dataset=mnist10k"):
        Config(model="text_head").validate()
    with pytest.raises(ConfigError, match="--encoder=npz needs --features"):
        Config(dataset="bbc_news", model="text_head", encoder="npz").validate()


@pytest.mark.slow
def test_20ng_flagfile_fails_clearly_without_the_corpus(tmp_path):
    env = dict(os.environ, MARFL_OFFLINE="1", SCIKIT_LEARN_DATA=str(tmp_path / "empty"))
    result = subprocess.run(
        [sys.executable, "-m", "launch.train", "--flagfile=launch/configs/20ng_n16.cfg",
         f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env=env)
    assert result.returncode == 2
    assert "--data_dir=PATH" in result.stderr and "Traceback" not in result.stderr
