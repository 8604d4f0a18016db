"""One frozen, validated experiment config.

Every field is also a command-line flag of `launch/train.py` with the same name: the flag
definitions are generated from this dataclass (`field_help`, `field_choices`), so the two never
drift apart. `Config.validate()` checks every value before any heavy work starts and raises
`ConfigError` whose message names the flag and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

IMAGE_DATASETS = ("mnist10k", "mnist", "fashion_mnist")
TEXT_DATASETS = ("bbc_news", "20newsgroups")
DATASETS = IMAGE_DATASETS + TEXT_DATASETS
MODELS = ("cnn", "mlp", "text_head")
ENCODERS = ("lsa", "npz")
ALGORITHMS = ("marfl", "fedavg", "arfl", "rdfl", "gossip")
SCHEDULES = ("authors", "mixed_radix")
WIRES = ("allgather", "butterfly")
PARTITIONS = ("iid", "iid_shuffled", "dirichlet")
DROPOUT_TIMINGS = ("before", "mid")
AVAILABILITY_MODELS = ("always", "markov")


class ConfigError(ValueError):
    """A bad config value; the message names the flag (`--name`) and what is allowed."""


def _field(default: Any, help: str, choices: tuple[str, ...] | None = None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a run. Defaults: the README's main job (MAR-FL, paper CNN, embedded
    MNIST, N=64 peers on a 4x4x4 key grid) — reaches 95 % test accuracy within minutes on a 2-core
    CPU."""

    # Data.
    dataset: str = _field("mnist10k", "Training data.", DATASETS)
    data_dir: str = _field("", "Folder with IDX files (mnist / fashion_mnist) or a TFDS data dir; "
                           "for 20newsgroups the 20news-bydate archive or its folder.")
    encoder: str = _field("lsa", "Text corpora: the frozen encoder, TF-IDF + SVD ('lsa', cached) "
                          "or precomputed features ('npz', see --features).", ENCODERS)
    features: str = _field("", "--encoder=npz: an .npz with x_train, y_train, x_test, y_test "
                           "(e.g. DistilBERT [CLS] features).")
    feature_dim: int = _field(768, "--encoder=lsa: feature dimensions (the paper's 768).")
    feature_cache: str = _field("", "Where LSA features are cached ('' = $MARFL_CACHE or "
                                "~/.cache/marfl_jax).")
    partition: str = _field("iid", "How training data is split across peers.", PARTITIONS)
    dirichlet_alpha: float = _field(1.0, "Concentration of the Dirichlet non-IID split (> 0).")
    # Model and local training.
    model: str = _field("cnn", "Model trained by every peer.", MODELS)
    conv_impl: str = _field("", "CNN convolution formulation ('' = the fastest, see models.py).")
    local_batches: int = _field(4, "Mini-batches b of local SGD per peer per iteration.")
    batch_size: int = _field(16, "Mini-batch size B.")
    learning_rate: float = _field(0.1, "Learning rate eta of momentum SGD.")
    momentum: float = _field(0.9, "EMA momentum beta: m <- beta*m + (1-beta)*g.")
    # Peers and aggregation.
    algorithm: str = _field("marfl", "Aggregation algorithm.", ALGORITHMS)
    num_peers: int = _field(64, "Number of peers N.")
    group_size: int = _field(4, "Moshpit group size M.")
    key_dim: int = _field(3, "Moshpit key dimension d (N = M^d gives exact averaging).")
    rounds: int = _field(0, "Averaging rounds G per iteration (0 = what the schedule needs to be "
                         "exact: key_dim, or the mixed-radix grid's axes; gossip: 1).")
    schedule: str = _field("authors", "MAR-FL group keys: the authors' rule (exact on a perfect "
                           "grid N = M^d, else their buckets) or an exact mixed-radix grid that "
                           "factors N into key_dim balanced group sizes.", SCHEDULES)
    wire: str = _field("allgather", "MAR-FL's wire protocol inside a group: the authors' "
                       "all-gather accounting or butterfly all-reduce.", WIRES)
    # Participation and churn (DESIGN.md section 3.2; marfl_jax/churn.py).
    update_fraction: float = _field(1.0, "Fraction of peers drawn to train each iteration.")
    aggregate_fraction: float = _field(
        1.0, "Fraction of peers drawn to aggregate (the same set as the trainers when equal).")
    dropout: float = _field(0.0, "Probability that an aggregating peer drops out.")
    dropout_timing: str = _field(
        "before", "When a dropping peer leaves: 'before' the aggregation (the authors) or 'mid' "
        "(after a random round; that round's group averages without it).", DROPOUT_TIMINGS)
    availability: str = _field(
        "always", "Peer availability across iterations: 'always', or 'markov' on/off chains.",
        AVAILABILITY_MODELS)
    mean_on_iterations: float = _field(10.0, "Markov availability: mean on-time (>= 1).")
    mean_off_iterations: float = _field(2.0, "Markov availability: mean off-time (>= 1).")
    # Moshpit Knowledge Distillation (DESIGN.md section 3, "MKD"; marfl_jax/mkd.py).
    mkd: bool = _field(False, "MAR-FL only: in the first --mkd_iterations iterations, distil "
                       "from group mates' predictions before averaging (weights cost 1 extra "
                       "payload per message).")
    mkd_iterations: int = _field(40, "K: MKD runs in iterations t < K, with lambda = 1 - t/K.")
    mkd_temperature: float = _field(3.0, "tau: softmax temperature of the distillation.")
    mkd_teacher_fraction: float = _field(
        0.4, "rho: keep the max(1, floor(rho * candidates)) lowest-KL mates (1.0 = all).")
    mkd_batches: int = _field(8, "Distillation mini-batches (of --batch_size) per round.")
    mkd_no_blending: bool = _field(
        False, "The authors' 'no blending' mode: loss = tau^2 * KL + CE, no lambda schedule.")
    # Differential privacy (DESIGN.md section 3, "DP"; marfl_jax/dp.py, accounting.py).
    dp: bool = _field(False, "Decentralized DP-FedAvg with adaptive clipping: clip and noise each "
                      "peer's update; epsilon from dp-accounting is logged at evaluations.")
    dp_noise_multiplier: float = _field(
        0.5, "z: the noise multiplier of the aggregate (split between updates and the clip "
        "count); must be < (peers drawn to aggregate) / 10.")
    dp_initial_clip: float = _field(0.1, "S_0: the initial clip threshold of the update norm.")
    dp_target_quantile: float = _field(0.5, "gamma: the unclipped fraction the threshold seeks.")
    dp_clip_lr: float = _field(0.2, "eta_c: S <- S * exp(-eta_c * (b - gamma)).")
    dp_server_lr: float = _field(0.1, "eta_s: peers share theta_ref + eta_s * s.")
    dp_server_momentum: float = _field(0.9, "beta_s: s <- beta_s * s + noised update.")
    dp_delta: float = _field(0.0, "delta of the reported (epsilon, delta); 0 = N^-1.1 (the "
                             "authors').")
    # Scale.
    peer_chunk: int = _field(0, "Train the peers in sequential chunks of this many (0 = all at "
                             "once): bounds activation memory, keeps a chunk's parameters in "
                             "cache.")
    memory_limit_gb: float = _field(
        0.0, "Refuse a run whose estimated device memory exceeds this (0 = the device's "
        "memory: available RAM on CPU).")
    # Evaluation and stopping.
    eval_every: int = _field(5, "Evaluate every k iterations (from iteration 0).")
    eval_peers: str = _field(
        "8", "Peers evaluated: 'all' present peers, 'mean' (consensus model) or a count k "
        "(a seeded sample of k present peers).")
    target_accuracy: float = _field(0.95, "Stop once the evaluated accuracy reaches this (0-1).")
    max_iterations: int = _field(500, "Stop after this many iterations.")
    seed: int = _field(0, "Seed of every random draw of the run.")
    workdir: str = _field("runs/default", "Where config.json, metrics.jsonl, summary.json and "
                          "checkpoints go; rerunning with the same workdir resumes.")
    checkpoint_every: int = _field(25, "Checkpoint every k iterations (0 = only at the end).")

    @property
    def eval_peer_count(self) -> int | None:
        """None for 'all'/'mean', else the sample size."""
        return None if self.eval_peers in ("all", "mean") else int(self.eval_peers)

    def validate(self) -> Config:
        """Returns self, or raises ConfigError naming the first bad flag."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"--{f.name}={value!r} is not allowed; choose one of: "
                                  + ", ".join(choices))
        _check(self.num_peers >= 1, "num_peers", self.num_peers, "an integer >= 1")
        _check(self.group_size >= 2, "group_size", self.group_size, "an integer >= 2")
        _check(self.key_dim >= 1, "key_dim", self.key_dim, "an integer >= 1")
        _check(self.rounds >= 0, "rounds", self.rounds, "an integer >= 0 (0 = key_dim)")
        _check(self.local_batches >= 1, "local_batches", self.local_batches, "an integer >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "a number > 0")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        _check(self.dirichlet_alpha > 0, "dirichlet_alpha", self.dirichlet_alpha, "a number > 0")
        _check(self.eval_every >= 1, "eval_every", self.eval_every, "an integer >= 1")
        for name in ("update_fraction", "aggregate_fraction"):
            value = getattr(self, name)
            _check(0 < value <= 1, name, value, "a number in (0, 1]")
        _check(0 <= self.dropout <= 1, "dropout", self.dropout, "a number in [0, 1]")
        for name in ("mean_on_iterations", "mean_off_iterations"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "a number >= 1")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every,
               "an integer >= 0")
        valid_eval = self.eval_peers in ("all", "mean") or (
            self.eval_peers.isdigit() and int(self.eval_peers) >= 1)
        _check(valid_eval, "eval_peers", self.eval_peers, "'all', 'mean' or an integer >= 1")
        _check(0 < self.target_accuracy <= 1, "target_accuracy", self.target_accuracy,
               "a number in (0, 1]")
        _check(self.max_iterations >= 1, "max_iterations", self.max_iterations, "an integer >= 1")
        _check(bool(self.workdir), "workdir", self.workdir, "a non-empty path")
        _check(self.mkd_iterations >= 1, "mkd_iterations", self.mkd_iterations,
               "an integer >= 1")
        _check(self.mkd_temperature > 0, "mkd_temperature", self.mkd_temperature, "a number > 0")
        _check(0 < self.mkd_teacher_fraction <= 1, "mkd_teacher_fraction",
               self.mkd_teacher_fraction, "a number in (0, 1]")
        _check(self.mkd_batches >= 1, "mkd_batches", self.mkd_batches, "an integer >= 1")
        _check(self.dp_noise_multiplier >= 0, "dp_noise_multiplier", self.dp_noise_multiplier,
               "a number >= 0")
        _check(self.dp_initial_clip > 0, "dp_initial_clip", self.dp_initial_clip, "a number > 0")
        _check(0 <= self.dp_target_quantile <= 1, "dp_target_quantile", self.dp_target_quantile,
               "a number in [0, 1]")
        _check(self.dp_clip_lr >= 0, "dp_clip_lr", self.dp_clip_lr, "a number >= 0")
        _check(self.dp_server_lr > 0, "dp_server_lr", self.dp_server_lr, "a number > 0")
        _check(0 <= self.dp_server_momentum < 1, "dp_server_momentum", self.dp_server_momentum,
               "a number in [0, 1)")
        _check(0 <= self.dp_delta < 1, "dp_delta", self.dp_delta,
               "a number in [0, 1) (0 = N^-1.1)")
        if self.dp:
            if self.update_fraction != self.aggregate_fraction:
                raise ConfigError(
                    f"--dp is not allowed with --update_fraction={self.update_fraction:g} != "
                    f"--aggregate_fraction={self.aggregate_fraction:g}: DP clips the update of "
                    "each peer that trained and shares it; use equal fractions")
            aggregating = self.aggregating_peers
            bound = aggregating / 10.0
            _check(self.dp_noise_multiplier < bound, "dp_noise_multiplier",
                   self.dp_noise_multiplier,
                   f"a number < n/10 = {bound:g} with n = {aggregating} peers drawn to aggregate "
                   "(z_Delta = (z^-2 - (n/10)^-2)^(-1/2) must be real); use more peers or a "
                   "smaller z")
        _check(self.peer_chunk >= 0, "peer_chunk", self.peer_chunk, "an integer >= 0")
        _check(self.memory_limit_gb >= 0, "memory_limit_gb", self.memory_limit_gb,
               "a number >= 0 (0 = the device's memory)")
        _check(self.feature_dim >= 1, "feature_dim", self.feature_dim, "an integer >= 1")
        text = self.dataset in TEXT_DATASETS
        if self.model == "cnn" and text:
            raise ConfigError(f"--model=cnn is not allowed with --dataset={self.dataset}: the "
                              "CNN takes images; use --model=text_head (or mlp)")
        if self.model == "text_head" and not text:
            raise ConfigError(f"--model=text_head is not allowed with --dataset={self.dataset}: "
                              "it takes text features; use one of: " + ", ".join(TEXT_DATASETS))
        if text and self.encoder == "npz" and not self.features:
            raise ConfigError("--encoder=npz needs --features=PATH.npz (arrays x_train, y_train, "
                              "x_test, y_test)")
        if self.mkd and self.algorithm != "marfl":
            raise ConfigError(f"--mkd is not allowed with --algorithm={self.algorithm}; "
                              "MKD distils within MAR-FL's groups: use --algorithm=marfl")
        if self.conv_impl:
            from marfl_jax import models  # Deferred: models imports jax.
            allowed = models.CONV_IMPLS
            _check(self.conv_impl in allowed, "conv_impl", self.conv_impl,
                   "one of: " + ", ".join(allowed))
        return self

    def churn_model(self):
        from marfl_jax import churn  # Deferred: churn imports jax.

        return churn.ChurnModel(self.update_fraction, self.aggregate_fraction, self.dropout,
                                self.dropout_timing, self.availability, self.mean_on_iterations,
                                self.mean_off_iterations)

    def distillation(self):
        """MKD's settings, or None when --mkd is off. Under DP the CE term is dropped (the
        authors: it would leak the labels past the noise)."""
        if not self.mkd:
            return None
        from marfl_jax import mkd  # Deferred: mkd imports jax.

        return mkd.Distillation(self.mkd_iterations, self.mkd_temperature,
                                self.mkd_teacher_fraction, self.mkd_batches,
                                blend=not self.mkd_no_blending, include_ce=not self.dp)

    @property
    def aggregating_peers(self) -> int:
        """n_0: peers drawn to aggregate each iteration (before dropout)."""
        return int(self.aggregate_fraction * self.num_peers)

    @property
    def privacy_delta(self) -> float:
        return self.dp_delta or self.num_peers**-1.1

    def privacy(self):
        """DP's settings, or None when --dp is off."""
        if not self.dp:
            return None
        from marfl_jax import dp  # Deferred: dp imports jax.

        return dp.Privacy(self.dp_noise_multiplier, self.dp_initial_clip,
                          self.dp_target_quantile, self.dp_clip_lr, self.dp_server_lr,
                          self.dp_server_momentum, self.aggregating_peers)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"--{name}={value!r} is not allowed; it must be {allowed}")


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def field_choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    return f.metadata.get("choices")
