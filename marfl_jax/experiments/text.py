"""The text task: the paper's head on frozen text features, BBC News (embedded) and 20
Newsgroups (where its corpus is present) with MAR-FL (section 5 of the reproduction).

    python -m launch.reproduce --experiments=text --text_data_dir=PATH_TO_20NG

Settings (`--option=NAME=V1,V2`, `STUDY.options`): `bbc_iterations` (BBC News's budget, default
100), `newsgroups_peers` (20 Newsgroups' N, default 16), `newsgroups_iterations` (200),
`feature_dim` (the frozen encoder's output, 768 like the paper's DistilBERT) and `data_dir`
(20 Newsgroups' corpus, '' = scikit-learn's cache; launch.reproduce's `--text_data_dir`).
`launch.compare --study=text` writes `text.csv` and `text.png`.
"""

from __future__ import annotations

import os

from marfl_jax import plotting
from marfl_jax.config import Config
from marfl_jax.report import gb, pct, set_of
from marfl_jax.scales import CONFIG_DIR, config_from_flagfile
from marfl_jax.sweep import RESULT_COLUMNS, ROW_FIELDS, Option, Study, result_row

OPTIONS = {
    "bbc_iterations": Option(100, int, "BBC News's iteration budget"),
    "newsgroups_peers": Option((16,), int, "20 Newsgroups' peer counts N (16, 64, 125: "
                               "launch/configs/20ng_n*.cfg)"),
    "newsgroups_iterations": Option(200, int, "20 Newsgroups' iteration budget"),
    "feature_dim": Option(768, int, "the frozen text encoder's output (the paper's "
                          "DistilBERT: 768)"),
    "data_dir": Option("", str, "20 Newsgroups' corpus ('' = scikit-learn's cache)"),
}


def configs(scale, workdir):
    options = STUDY.options_of(scale)
    features = os.path.join(workdir, "features")
    bbc = config_from_flagfile(os.path.join(CONFIG_DIR, "bbc_news.cfg"),
                               max_iterations=options.bbc_iterations, checkpoint_every=0,
                               replicas=scale.mnist.replicas,
                               feature_dim=options.feature_dim, feature_cache=features,
                               workdir=os.path.join(workdir, "bbc_news_n16"))
    runs = [bbc.validate()]
    for n in options.newsgroups_peers:
        runs.append(config_from_flagfile(
            os.path.join(CONFIG_DIR, f"20ng_n{n}.cfg"), data_dir=options.data_dir,
            max_iterations=options.newsgroups_iterations, checkpoint_every=0,
            replicas=scale.mnist.replicas,
            feature_dim=options.feature_dim, feature_cache=features,
            workdir=os.path.join(workdir, f"20newsgroups_n{n}")).validate())
    return runs


def text_row(config: Config, result) -> dict:
    return {"dataset": config.dataset, **result_row(config, result),
            "target_accuracy": config.target_accuracy}


def setting(scale, configs):
    return ("BBC News (embedded, 5 classes, N = 16 on a 4x4 grid, target 95 %) and 20 "
            f"Newsgroups (N in {set_of(STUDY.options_of(scale).newsgroups_peers)}, "
            "the settings of launch/configs/20ng_n*.cfg, target 50 %), both through the "
            "frozen LSA encoder (TF-IDF + SVD to 768-d; not DistilBERT) and the paper's "
            "head, MAR-FL.")


def summarize(rows) -> str:
    return " ".join(
        f"{r['dataset']} (N = {r['num_peers']}): {pct(r['final_accuracy'])} after "
        f"{r['iterations']} iterations, target {pct(r['target_accuracy'])} "
        + (f"reached at iteration {r['iterations_to_target']} with {gb(r['bytes_to_target'])}."
           if r["reached_target"] else "not reached.") for r in rows)


STUDY = Study(
    name="text",
    configs=configs,
    options=OPTIONS,
    make_row=text_row,
    fields=("dataset", *ROW_FIELDS, "target_accuracy"),
    draw=lambda rows, curves, configs, path: plotting.plot_accuracy_vs_bytes(
        curves, path, (0.5,)),
    section=5,
    title="The text task: a head on frozen text features",
    claim=("On 20 Newsgroups the paper trains a 56,828-parameter head on frozen 768-d "
           "DistilBERT features and stops at 50 % accuracy; MAR-FL reaches it like the "
           "baselines with far fewer bytes."),
    setting=setting,
    columns=(("dataset", "dataset"), ("num_peers", "N"), *RESULT_COLUMNS),
    summarize=summarize,
    data_flag="--text_data_dir")
