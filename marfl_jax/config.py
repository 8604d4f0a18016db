"""One frozen, validated experiment config.

Every field is also a command-line flag of `launch/train.py` with the same name: the flag
definitions are generated from this dataclass (`field_help`, `field_choices`), so the two never
drift apart. Fields are grouped by concern (`SECTIONS`); each field carries its own check, and
checks across fields sit in one method per concern. `Config.validate()` runs them all before
any heavy work starts and raises `ConfigError` whose message names the flag and the allowed
values. Choices come from the registries of the modules that implement them (a registered
algorithm, model, dataset, partition or wire model is a valid value at once).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

from marfl_jax.registry import ConfigError

__all__ = ["Config", "ConfigError", "SECTIONS", "field_choices", "field_help", "peer_count"]

PRECISIONS = ("highest", "high", "default")
ASYNCHRONOUS_ALGORITHMS = ("marfl", "gossip")
DP_ACCOUNTING = "dp-accounting==0.6.0"
T = TypeVar("T")


def _names(module: str, attribute: str) -> Callable[[], tuple[str, ...]]:
    """The allowed values of a flag, read (lazily: the modules import jax) from a registry or
    a tuple of names."""

    def names() -> tuple[str, ...]:
        value = getattr(importlib.import_module(module), attribute)
        return tuple(value.names() if hasattr(value, "names") else value)

    return names


def _field(default: Any, help: str, choices: Callable[[], tuple[str, ...]] | None = None,
           check: tuple[Callable[[Any], bool], str] | None = None):
    """A config field: its default, help, allowed names (a callable) or check
    (predicate, the allowed values in words)."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "choices": choices, "check": check})


def _at_least(bound, kind="an integer"):
    return (lambda v: v >= bound), f"{kind} >= {bound}"


AUTO = "auto"  # --aggregator_f's default: resolved per run (`Config.tolerated_f`).


def _is_count(value: Any) -> bool:
    """An integer >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _integer_or_as_given(value: Any) -> Any:
    """An integer given as a string (a flag, a flagfile: '2') as that integer, any other value
    as given (validation refuses what is neither 'auto' nor an integer >= 0)."""
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
        return int(value)
    return value


_POSITIVE = ((lambda v: v > 0), "a number > 0")
_UNIT = ((lambda v: 0 <= v <= 1), "a number in [0, 1]")
_OPEN_UNIT = ((lambda v: 0 <= v < 1), "a number in [0, 1)")
_FRACTION = ((lambda v: 0 < v <= 1), "a number in (0, 1]")
_NON_NEGATIVE = ((lambda v: v >= 0), "a number >= 0")


def peer_count(fraction: float, num_peers: int) -> int:
    """floor(fraction * N), as `marfl_jax.churn.peer_count` draws them."""
    from marfl_jax.churn import peer_count  # Deferred: churn imports jax.

    return peer_count(fraction, num_peers)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a run. Defaults: the README's main job (MAR-FL, paper CNN, embedded
    MNIST, N=64 peers on a 4x4x4 key grid) — reaches 95 % test accuracy within minutes on a 2-core
    CPU."""

    # Data.
    dataset: str = _field("mnist10k", "Training data.", _names("marfl_jax.data", "DATASETS"))
    data_dir: str = _field("", "Folder with IDX files (mnist / fashion_mnist) or a TFDS data dir; "
                           "for 20newsgroups the 20news-bydate archive or its folder.")
    encoder: str = _field("lsa", "Text corpora: the frozen encoder, TF-IDF + SVD ('lsa', cached) "
                          "or precomputed features ('npz', see --features).",
                          _names("marfl_jax.data.encoders", "ENCODERS"))
    features: str = _field("", "--encoder=npz: an .npz with x_train, y_train, x_test, y_test "
                           "(e.g. DistilBERT [CLS] features).")
    feature_dim: int = _field(768, "--encoder=lsa: feature dimensions (the paper's 768).",
                              check=_at_least(1))
    feature_cache: str = _field("", "Where LSA features are cached ('' = $MARFL_CACHE or "
                                "~/.cache/marfl_jax).")
    partition: str = _field("iid", "How training data is split across peers.",
                            _names("marfl_jax.data", "PARTITIONS"))
    dirichlet_alpha: float = _field(1.0, "Concentration of the Dirichlet non-IID split (> 0).",
                                    check=_POSITIVE)
    # Model and local training.
    model: str = _field("cnn", "Model trained by every peer.", _names("marfl_jax.models", "MODELS"))
    conv_impl: str = _field("", "CNN convolution formulation ('' = the default, see "
                            "marfl_jax/layers.py).",
                            check=(lambda v: v == "" or v in _names("marfl_jax.models",
                                                                    "CONV_IMPLS")(),
                                   "'' or one of the CNN's lowerings (marfl_jax.models."
                                   "CONV_IMPLS)"))
    compute_dtype: str = _field(
        "float32", "Dtype of the forward and backward passes' matmuls and convolutions; "
        "parameters, momentum, averaging and the ledger stay float32.",
        lambda: ("float32", "bfloat16"))
    matmul_precision: str = _field(
        "highest", "Precision of float32 matmuls and convolutions for the whole run (jax_default_"
        "matmul_precision): 'highest' = float32 (the paper); 'high' and 'default' let NVIDIA "
        "GPUs use TF32 (faster, 10 mantissa bits); a CPU computes float32 at each.",
        lambda: PRECISIONS)
    local_batches: int = _field(4, "Mini-batches b of local SGD per peer per iteration.",
                                check=_at_least(1))
    batch_size: int = _field(16, "Mini-batch size B.", check=_at_least(1))
    learning_rate: float = _field(0.1, "Learning rate eta of momentum SGD.", check=_POSITIVE)
    momentum: float = _field(0.9, "EMA momentum beta: m <- beta*m + (1-beta)*g.",
                             check=_OPEN_UNIT)
    # Peers and aggregation.
    algorithm: str = _field("marfl", "Aggregation algorithm.",
                            _names("marfl_jax.algorithms", "ALGORITHMS"))
    num_peers: int = _field(64, "Number of peers N.", check=_at_least(1))
    group_size: int = _field(4, "Moshpit group size M.", check=_at_least(2))
    key_dim: int = _field(3, "Moshpit key dimension d (N = M^d gives exact averaging).",
                          check=_at_least(1))
    rounds: int = _field(0, "Averaging rounds G per iteration (0 = what the schedule needs to be "
                         "exact: key_dim, or the mixed-radix grid's axes; gossip: 1).",
                         check=((lambda v: v >= 0), "an integer >= 0 (0 = key_dim)"))
    schedule: str = _field("authors", "MAR-FL group keys: the authors' rule (exact on a perfect "
                           "grid N = M^d, else their buckets) or an exact mixed-radix grid that "
                           "factors N into key_dim balanced group sizes.",
                           _names("marfl_jax.algorithms.marfl", "SCHEDULES"))
    wire: str = _field("allgather", "MAR-FL's wire protocol inside a group: the authors' "
                       "all-gather accounting, butterfly all-reduce, or a server per group.",
                       _names("marfl_jax.comm", "WIRE_MODELS"))
    # What crosses the wire (marfl_jax/codec.py).
    codec: str = _field("float32", "How every payload is encoded on the wire (weights, "
                        "momentum, DP's update, MKD's teachers); float32 = as is.",
                        _names("marfl_jax.codec", "CODECS"))
    codec_block: int = _field(4096, "--codec=int8: values per absmax block (one float32 scale "
                              "each, counted in the bytes).", check=_at_least(1))
    share_momentum: bool = _field(True, "Messages carry the momentum beside the weights (the "
                                  "authors); false: weights only, each peer keeps its own "
                                  "momentum (1 payload per message).")
    # How a group combines what its members receive (marfl_jax/rules.py).
    aggregator: str = _field("mean", "The group rule: what each group's members take from the "
                             "copies they receive in a round ('mean' = the authors' average).",
                             _names("marfl_jax.rules", "RULES"))
    aggregator_f: int | str = _field(
        AUTO, "Robust rules (trimmed_mean, krum): the Byzantine copies a group tolerates, f (a "
        "group of n uses min(f, (n - 1) // 2)); 'auto' = the attackers a full group holds at "
        "--byzantine_fraction p: max(1, ceil(p M)), at most (M - 1) // 2, M the algorithm's "
        "largest group (FedAvg's server: N). A rule that is the group mean with the f it gets "
        "(trimmed_mean with f = 0, the median of pairs) is reported in a warning.",
        check=((lambda v: v == AUTO or _is_count(v)), "'auto' or an integer >= 0"))
    clip_tau: float = _field(0.0, "The clipping radius tau of the clipping rules (centered_clip, "
                             "centered_clip_previous, self_centered_clip), on the norm of a "
                             "whole copy's difference; required by them (0 = unset: a radius "
                             "above every difference would make them the mean).",
                             check=((lambda v: v >= 0), "a number >= 0"))
    clip_iterations: int = _field(1, "--aggregator=centered_clip: the clipping iterations L.",
                                  check=_at_least(1))
    # Byzantine peers (marfl_jax/adversary.py) and what they send (marfl_jax/attacks.py).
    byzantine_fraction: float = _field(0.0, "Fraction of peers that attack: floor(fraction * N) "
                                       "peers drawn once from --seed; churn samples them like "
                                       "everyone else. Needs --attack.",
                                       check=((lambda v: 0 <= v < 0.5), "a number in [0, 0.5)"))
    byzantine_placement: str = _field("random", "Where attackers sit in the groups: 'random' "
                                      "(as the schedule puts them) or 'collude' (they announce "
                                      "the keys that pack them into the same groups).",
                                      _names("marfl_jax.adversary", "PLACEMENTS"))
    attack: str = _field("none", "What Byzantine members send in place of their copies "
                         "(computed from their group's honest copies).",
                         _names("marfl_jax.attacks", "ATTACKS"))
    attack_sigma: float = _field(1.0, "--attack=gaussian: the noise's standard deviation.",
                                 check=_NON_NEGATIVE)
    attack_tau: float = _field(1.5, "--attack=alie, ipm: the attack factor tau (ByzFL's "
                               "defaults: alie 1.5, ipm 2.0; ipm needs tau > 0).",
                               check=((lambda v: math.isfinite(v)), "a finite number"))
    # Participation and churn (marfl_jax/churn.py).
    update_fraction: float = _field(1.0, "Fraction of peers drawn to train each iteration "
                                    "(floor(fraction * N) peers, at least 1).", check=_FRACTION)
    aggregate_fraction: float = _field(
        1.0, "Fraction of peers drawn to aggregate (the same set as the trainers when equal).",
        check=_FRACTION)
    dropout: float = _field(0.0, "Probability that an aggregating peer drops out.", check=_UNIT)
    dropout_timing: str = _field(
        "before", "When a dropping peer leaves: 'before' the aggregation (the authors) or 'mid' "
        "(after a random round; that round's group averages without it).",
        _names("marfl_jax.churn", "DROPOUT_TIMINGS"))
    availability: str = _field(
        "always", "Peer availability across iterations: 'always', or 'markov' on/off chains.",
        _names("marfl_jax.churn", "AVAILABILITY_MODELS"))
    mean_on_iterations: float = _field(10.0, "Markov availability: mean on-time (>= 1).",
                                       check=_at_least(1, "a number"))
    mean_off_iterations: float = _field(2.0, "Markov availability: mean off-time (>= 1).",
                                        check=_at_least(1, "a number"))
    # Moshpit Knowledge Distillation (marfl_jax/mkd.py).
    mkd: bool = _field(False, "MAR-FL only: in the first --mkd_iterations iterations, distil "
                       "from group mates' predictions before averaging (weights cost 1 extra "
                       "payload per message).")
    mkd_iterations: int = _field(40, "K: MKD runs in iterations t < K, with lambda = 1 - t/K.",
                                 check=_at_least(1))
    mkd_temperature: float = _field(3.0, "tau: softmax temperature of the distillation.",
                                    check=_POSITIVE)
    mkd_teacher_fraction: float = _field(
        0.4, "rho: keep the max(1, floor(rho * candidates)) lowest-KL mates (1.0 = all).",
        check=_FRACTION)
    mkd_batches: int = _field(8, "Distillation mini-batches (of --batch_size) per round.",
                              check=_at_least(1))
    mkd_no_blending: bool = _field(
        False, "The authors' 'no blending' mode: loss = tau^2 * KL + CE, no lambda schedule.")
    # Differential privacy (marfl_jax/dp.py, accounting.py).
    dp: bool = _field(False, "Decentralized DP-FedAvg with adaptive clipping: clip and noise each "
                      "peer's update; epsilon from dp-accounting is logged at evaluations.")
    dp_noise_multiplier: float = _field(
        0.5, "z: the noise multiplier of the aggregate (split between updates and the clip "
        "count); must be < (peers drawn to aggregate) / 10.",
        check=((lambda v: v >= 0), "a number >= 0"))
    dp_initial_clip: float = _field(0.1, "S_0: the initial clip threshold of the update norm.",
                                    check=_POSITIVE)
    dp_target_quantile: float = _field(0.5, "gamma: the unclipped fraction the threshold seeks.",
                                       check=_UNIT)
    dp_clip_lr: float = _field(0.2, "eta_c: S <- S * exp(-eta_c * (b - gamma)).",
                               check=((lambda v: v >= 0), "a number >= 0"))
    dp_server_lr: float = _field(0.1, "eta_s: peers share theta_ref + eta_s * s.",
                                 check=_POSITIVE)
    dp_server_momentum: float = _field(0.9, "beta_s: s <- beta_s * s + noised update.",
                                       check=_OPEN_UNIT)
    dp_delta: float = _field(0.0, "delta of the reported (epsilon, delta); 0 = N^-1.1 (the "
                             "authors').", check=((lambda v: 0 <= v < 1),
                                                  "a number in [0, 1) (0 = N^-1.1)"))
    dp_noise_peers: str = _field(
        "aggregating", "n of the noise split z_Delta, sigma_b = n/20: the peers 'aggregating' "
        "this iteration, after dropout (the authors), or the peers 'drawn' to aggregate "
        "(constant per run).", lambda: ("aggregating", "drawn"))
    # The simulated clock (marfl_jax/clock.py, network.py; assumptions in docs/running.md).
    network: str = _field(
        "none", "Peer links and speeds of the simulated clock: 'none' (no clock), 'uniform' "
        "(the flags below), 'lognormal' (each rate log-normal around its flag) or 'trace' "
        "(--network_trace).", _names("marfl_jax.network", "NETWORKS"))
    network_trace: str = _field("", "--network=trace: a CSV with one row per peer: "
                                "uplink_mbps, downlink_mbps, latency_ms, and examples_per_s "
                                "or gflops.")
    uplink_mbps: float = _field(10.0, "A peer's uplink, Mbit/s (lognormal: the median).",
                                check=_POSITIVE)
    downlink_mbps: float = _field(50.0, "A peer's downlink, Mbit/s (lognormal: the median).",
                                  check=_POSITIVE)
    latency_ms: float = _field(50.0, "A message's latency, ms.",
                               check=_NON_NEGATIVE)
    bandwidth_sigma: float = _field(1.0, "--network=lognormal: sigma of log(link rate).",
                                    check=_NON_NEGATIVE)
    examples_per_s: float = _field(100.0, "A peer's training speed, examples/s (lognormal: "
                                   "the median).", check=_POSITIVE)
    compute_sigma: float = _field(0.5, "--network=lognormal: sigma of log(training speed).",
                                  check=_NON_NEGATIVE)
    server_mbps: float = _field(1000.0, "FedAvg's (and --wire=star's) server link, Mbit/s "
                                "each direction.", check=_POSITIVE)
    round_timeout_s: float = _field(
        0.0, "Round deadline, s (0 = none): a member whose transfers in a round would end "
        "later misses it and the rest of the iteration.",
        check=((lambda v: v >= 0), "a number >= 0 (0 = no deadline)"))
    # Asynchronous Moshpit (marfl_jax/events.py, asynchronous.py).
    asynchronous: bool = _field(
        False, "No global barrier: a peer that finished its local phase looks for mates among "
        "the ready peers with its key (MAR-FL; gossip: any ready peer, pairs) for "
        "--matchmaking_window_s, averages, and trains on; rows every --row_every_s simulated "
        "seconds. Needs --network.")
    matchmaking_window_s: float = _field(
        2.0, "--asynchronous: how long a group stays open for mates after its first member is "
        "ready (it closes earlier when full); a peer alone at its end trains on.",
        check=_POSITIVE)
    row_every_s: float = _field(30.0, "--asynchronous: a metrics row every this many simulated "
                                "seconds.", check=_POSITIVE)
    wave_layout: str = _field(
        "auto", "--asynchronous: how a wave's device step covers its peers: 'buckets' (gathered "
        "into a power-of-two bucket), 'masks' (all N peers, the others masked) or 'auto' (the "
        "plan's measured choice for N).", lambda: ("auto", "masks", "buckets"))
    # Scale.
    peer_chunk: int = _field(0, "Train the peers in sequential chunks of this many (0 = all at "
                             "once): bounds activation memory, keeps a chunk's parameters in "
                             "cache.", check=((lambda v: v >= 0), "an integer >= 0"))
    plan: str = _field(
        "auto", "How the local update runs: 'auto' times the exact formulations (peer chunks, "
        "convolution lowerings) at start-up and keeps the fastest (cached on disk; flags set "
        "explicitly are kept), 'fixed' uses --peer_chunk and --conv_impl as given.",
        lambda: ("auto", "fixed"))
    plan_budget_s: float = _field(
        30.0, "--plan=auto: seconds spent timing candidates at most; on a CPU compilation is not "
        "counted, on accelerators it is (a candidate starts only while the time spent plus the "
        "longest compile so far fits). The per-peer scan, a middle chunk and all peers at once "
        "are timed first.",
        check=_POSITIVE)
    memory_limit_gb: float = _field(
        0.0, "Refuse a run whose estimated device memory exceeds this (0 = the device's "
        "memory: available RAM on CPU).",
        check=((lambda v: v >= 0), "a number >= 0 (0 = the device's memory)"))
    deterministic: bool = _field(
        True, "GPUs: deterministic XLA ops (--xla_gpu_deterministic_ops, set before the backend "
        "starts), so a resumed run is bit-identical; false: faster scatter-adds, runs may differ "
        "in the last bits. No effect on CPU.")
    # Evaluation and stopping.
    eval_every: int = _field(5, "Evaluate every k iterations (from iteration 0).",
                             check=_at_least(1))
    eval_peers: str = _field(
        "8", "Peers evaluated: 'all' present peers, 'mean' (consensus model) or a count k "
        "(a seeded sample of k present peers).",
        check=((lambda v: v in ("all", "mean") or (v.isdigit() and int(v) >= 1)),
               "'all', 'mean' or an integer >= 1"))
    target_accuracy: float = _field(0.95, "Stop once the evaluated accuracy reaches this (0-1).",
                                    check=_FRACTION)
    max_iterations: int = _field(500, "Stop after this many iterations.", check=_at_least(1))
    seed: int = _field(0, "Seed of every random draw of the run.")
    replicas: int = _field(1, "Run R independent replicas of this run in one compiled program, "
                           "replica r with --seed + r; rows give each metric's mean over the "
                           "replicas and its _std, metrics_replicas.jsonl each replica's rows, "
                           "the summary 95 percent intervals.", check=_at_least(1))
    workdir: str = _field("runs/default", "Where config.json, metrics.jsonl, summary.json and "
                          "checkpoints go; rerunning with the same workdir resumes.",
                          check=(bool, "a non-empty path"))
    checkpoint_every: int = _field(25, "Checkpoint every k iterations (0 = only at the end).",
                                   check=((lambda v: v >= 0), "an integer >= 0"))
    wandb_project: str = _field("", "Also log the rows to this Weights & Biases project ('' = "
                                "off; needs pip install wandb). TensorBoard files are always "
                                "written to WORKDIR/tb/.")

    def __post_init__(self) -> None:
        # --aggregator_f holds 'auto' or an int however it was given (flag, flagfile, the int of
        # an older config.json), so that equal settings compare equal.
        object.__setattr__(self, "aggregator_f", _integer_or_as_given(self.aggregator_f))

    def validate(self) -> Config:
        """Returns self, or raises ConfigError naming the first bad flag."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = field_choices(f)
            if choices and value not in choices:
                raise ConfigError(f"--{f.name}={value!r} is not allowed; choose one of: "
                                  + ", ".join(choices))
            check = f.metadata.get("check")
            if check is not None:
                _check(check[0](value), f.name, value, check[1])
        self._check_data()
        algorithm = self._algorithm()  # Built once: three checks ask it.
        self._check_aggregator(algorithm)
        self._check_wire(algorithm)
        self._check_attack()
        self._check_participation()
        self._check_distillation(algorithm)
        self._check_privacy()
        self._check_network()
        self._check_asynchronous()
        self._check_replicas()
        self._check_tracking()
        return self

    def _check_data(self) -> None:
        from marfl_jax import data, models  # Deferred: they import jax.

        gives = getattr(data.DATASETS.get(self.dataset), "inputs", None)
        takes = getattr(models.MODELS.get(self.model), "inputs", None)
        if gives and takes and gives not in takes:
            fitting = [name for name in models.MODELS.names()
                       if gives in getattr(models.MODELS.get(name), "inputs", (gives,))]
            raise ConfigError(f"--model={self.model} is not allowed with --dataset="
                              f"{self.dataset}: the model takes {' or '.join(takes)}, the "
                              f"dataset gives {gives}; use --model= one of: "
                              + ", ".join(fitting))
        if gives == "features" and self.encoder == "npz" and not self.features:
            raise ConfigError("--encoder=npz needs --features=PATH.npz (arrays x_train, y_train, "
                              "x_test, y_test)")

    def _algorithm(self):
        from marfl_jax import algorithms  # Deferred: it imports jax.

        return algorithms.make_algorithm(self.settings(algorithms.Settings))

    def _check_aggregator(self, algorithm) -> None:
        from marfl_jax import rules  # Deferred: it imports jax.

        rule = rules.RULES.get(self.aggregator)
        if self.dp and not rule.exact_mean:
            raise ConfigError(f"--aggregator={self.aggregator} is not allowed with --dp: DP's "
                              "noise and accounting assume the group mean of the clipped "
                              "updates; use --aggregator=mean")
        if rule.clips and self.clip_tau <= 0:
            raise ConfigError(f"--aggregator={self.aggregator} needs --clip_tau > 0, its clipping "
                              "radius on the norm of a copy's difference (ByzFL's default 100 is "
                              "above any difference of these models' copies: the rule would be "
                              "the mean); e.g. --clip_tau=1")
        largest = algorithm.max_group_size
        if rule.honest_majority and 2 * self.tolerated_f(largest) >= largest:
            raise ConfigError(
                f"--aggregator_f={self.aggregator_f} with --aggregator={self.aggregator}: a "
                f"full group of {largest} has no honest majority for f; use --aggregator_f < "
                f"{largest / 2:g} or --aggregator_f=auto")

    def _check_wire(self, algorithm) -> None:
        """What the algorithm's wire can do, asked once: slots (a rule other than the mean, or
        attackers) on a wire that slices the message, a lossy codec on a wire that cannot
        combine coded copies, the clock on a wire without timing."""
        from marfl_jax import codec, comm, rules  # Deferred: they import jax.

        wire_name = algorithm.wire
        wire, label = comm.get_wire(wire_name), comm.wire_label(wire_name)
        slots = not rules.RULES.get(self.aggregator).exact_mean or self.byzantine_fraction > 0
        if slots and wire.slices:
            raise ConfigError(
                f"--wire={self.wire} slices the message (each member reduces its slice) and is "
                f"not built for --aggregator={self.aggregator} or Byzantine peers (the rule "
                "would run per slice at each slice's owner); use --wire=allgather")
        if not codec.CODECS.get(self.codec).lossless and wire.combine is None:
            raise ConfigError(f"--codec={self.codec}: the wire {label} of --algorithm="
                              f"{self.algorithm} does not say how a group combines copies "
                              "received through a lossy codec (Wire.combine is None); use "
                              "--codec=float32 or give the wire a combine")
        if self.network != "none" and wire.seconds is None:
            raise ConfigError(f"--network={self.network}: the wire {label} of --algorithm="
                              f"{self.algorithm} (--wire={self.wire}) has no clock timing "
                              "(marfl_jax.comm.Wire.seconds); give it one")

    def _check_attack(self) -> None:
        from marfl_jax import adversary, attacks  # Deferred: they import jax.

        attackers = adversary.pool_size(self.num_peers, self.byzantine_fraction)
        attack = attacks.ATTACKS.get(self.attack)
        if (attack.forge is not None or attack.poisons_labels) != (attackers > 0):
            raise ConfigError(
                f"--attack={self.attack} with --byzantine_fraction={self.byzantine_fraction} "
                f"({attackers} of {self.num_peers} peers): an attack needs attackers and "
                "attackers need an attack; set both (--attack one of: "
                f"{', '.join(attacks.ATTACKS.names())}) or neither")
        if attackers and self.dp:
            raise ConfigError("--byzantine_fraction is not allowed with --dp: DP's noise and "
                              "accounting assume honest clipped updates; use one or the other")
        problem = attack.check and attack.check(
            attacks.Params(float(self.attack_sigma), float(self.attack_tau)))
        if problem:
            raise ConfigError(problem)

    def _check_participation(self) -> None:
        for name in ("update_fraction", "aggregate_fraction"):
            fraction = getattr(self, name)
            count = peer_count(fraction, self.num_peers)
            _check(count >= 1, name, fraction,
                   f"a number in [1/N, 1] = [{1 / self.num_peers:.4g}, 1] with "
                   f"--num_peers={self.num_peers}: floor({fraction:g} * {self.num_peers}) = "
                   f"{count} peers would take part")

    def _check_distillation(self, algorithm) -> None:
        if self.mkd and not algorithm.group_keys:
            raise ConfigError(f"--mkd is not allowed with --algorithm={self.algorithm}; "
                              "MKD distils within MAR-FL's groups: use --algorithm=marfl")

    def _check_privacy(self) -> None:
        if not self.dp:
            return
        if not installed("dp_accounting"):
            raise ConfigError(f"--dp needs dp-accounting (its privacy accountant): pip install "
                              f"{DP_ACCOUNTING} (or pip install -r requirements.txt -e .)")
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

    def _check_network(self) -> None:
        if self.network == "trace" and not self.network_trace:
            raise ConfigError("--network=trace needs --network_trace=PATH.csv (columns "
                              "uplink_mbps, downlink_mbps, latency_ms, examples_per_s or gflops)")
        if self.network_trace and self.network != "trace":
            raise ConfigError(f"--network_trace is used only with --network=trace (got "
                              f"--network={self.network})")
        if self.network == "trace":
            from marfl_jax import network  # Deferred: it imports jax.

            network.load_trace(self.network_trace, self.num_peers)
        if self.round_timeout_s and self.network == "none":
            raise ConfigError("--round_timeout_s needs the clock: set --network to one of: "
                              "uniform, lognormal, trace")

    def _check_replicas(self) -> None:
        if self.replicas > 1 and self.asynchronous:
            raise ConfigError(f"--replicas={self.replicas} is not allowed with --asynchronous: "
                              "each replica's timeline schedules different device waves; run "
                              "the seeds one by one (--seed) or use --replicas=1")

    def _check_asynchronous(self) -> None:
        if not self.asynchronous:
            return
        refused = [
            (self.network == "none", "needs the simulated clock: set --network to one of: "
             "uniform, lognormal, trace"),
            (self.algorithm not in ASYNCHRONOUS_ALGORITHMS, f"is not allowed with --algorithm="
             f"{self.algorithm}; use one of: {', '.join(ASYNCHRONOUS_ALGORITHMS)}"),
            (self.dp, "is not allowed with --dp: the accountant counts synchronous rounds of "
             "every drawn peer; asynchronous groups would need per-peer accounting"),
            (self.mkd, "is not allowed with --mkd: MKD distils within a synchronous round's "
             "groups"),
            (self.round_timeout_s > 0, "is not allowed with --round_timeout_s: the deadline cuts "
             "a synchronous round; asynchronous groups wait --matchmaking_window_s instead"),
            (self.availability != "always", "is not allowed with --availability=markov (its "
             "chains step per iteration); use --update_fraction, --aggregate_fraction and "
             "--dropout, drawn per local phase"),
            (self.byzantine_placement != "random", "is not allowed with --byzantine_placement="
             f"{self.byzantine_placement}: colluding keys are drawn per synchronous iteration"),
        ]
        for refused_, why in refused:
            if refused_:
                raise ConfigError(f"--asynchronous {why}")

    def _check_tracking(self) -> None:
        if self.wandb_project and not installed("wandb"):
            raise ConfigError(wandb_missing(self.wandb_project))

    def section(self, name: str) -> dict[str, Any]:
        """The fields of one concern (a key of SECTIONS) and their values."""
        return {field: getattr(self, field) for field in SECTIONS[name]}

    def settings(self, kind: type[T]) -> T:
        """The settings a piece reads, as its own NamedTuple `kind` whose fields are Config
        fields (`network.Settings`, `evaluation.Settings`, `plan.Request`, ...): pieces below
        the runner receive these, never the Config."""
        return kind(*(getattr(self, name) for name in kind._fields))

    def tolerated_f(self, largest_group: int) -> int:
        """The f the group rule gets (`rules.Params.f`): --aggregator_f, or for 'auto'
        `rules.auto_f(--byzantine_fraction, largest_group)`, where largest_group is the
        algorithm's `max_group_size`. A bad value raises ConfigError naming the flag."""
        value = self.aggregator_f
        if value == AUTO:
            from marfl_jax import rules  # Deferred: it imports jax.

            return rules.auto_f(self.byzantine_fraction, largest_group)
        _check(_is_count(value), "aggregator_f", value, "'auto' or an integer >= 0")
        return value

    @property
    def aggregating_peers(self) -> int:
        """n_0: peers drawn to aggregate each iteration (before dropout)."""
        return peer_count(self.aggregate_fraction, self.num_peers)

    @property
    def privacy_delta(self) -> float:
        return self.dp_delta or self.num_peers**-1.1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """A Config from a config.json's values (fields added since it was written keep their
        defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)


SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("dataset", "data_dir", "encoder", "features", "feature_dim", "feature_cache",
             "partition", "dirichlet_alpha"),
    "model": ("model", "conv_impl", "compute_dtype", "matmul_precision", "local_batches",
              "batch_size", "learning_rate", "momentum"),
    "algorithm": ("algorithm", "num_peers", "group_size", "key_dim", "rounds", "schedule",
                  "wire"),
    "messages": ("codec", "codec_block", "share_momentum", "aggregator", "aggregator_f",
                 "clip_tau", "clip_iterations"),
    "adversary": ("byzantine_fraction", "byzantine_placement", "attack", "attack_sigma",
                  "attack_tau"),
    "churn": ("update_fraction", "aggregate_fraction", "dropout", "dropout_timing",
              "availability", "mean_on_iterations", "mean_off_iterations"),
    "mkd": ("mkd", "mkd_iterations", "mkd_temperature", "mkd_teacher_fraction", "mkd_batches",
            "mkd_no_blending"),
    "dp": ("dp", "dp_noise_multiplier", "dp_initial_clip", "dp_target_quantile", "dp_clip_lr",
           "dp_server_lr", "dp_server_momentum", "dp_delta", "dp_noise_peers"),
    "network": ("network", "network_trace", "uplink_mbps", "downlink_mbps", "latency_ms",
                "bandwidth_sigma", "examples_per_s", "compute_sigma", "server_mbps",
                "round_timeout_s"),
    "asynchrony": ("asynchronous", "matchmaking_window_s", "row_every_s", "wave_layout"),
    "scale": ("peer_chunk", "plan", "plan_budget_s", "memory_limit_gb", "deterministic"),
    "run": ("eval_every", "eval_peers", "target_accuracy", "max_iterations", "seed", "replicas",
            "workdir", "checkpoint_every", "wandb_project"),
}


def installed(module: str) -> bool:
    """Whether a top-level module can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # Blocked (sys.modules[name] = None) or a broken spec.
        return False


def wandb_missing(project: str) -> str:
    """The error of --wandb_project without wandb installed."""
    return (f"--wandb_project={project!r} needs wandb, which is not installed: pip install wandb "
            "(or leave --wandb_project empty; TensorBoard files are written anyway)")


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"--{name}={value!r} is not allowed; it must be {allowed}")


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def field_choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The allowed values of a choice field (from its registry), else None."""
    choices = f.metadata.get("choices")
    return None if choices is None else choices()
