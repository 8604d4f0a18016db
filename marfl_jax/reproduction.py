"""The MAR-FL paper's experiments as this simulator reproduces them, and the report on them.

An `Experiment` is a list of runs (Configs, each with its own workdir), a row per finished run,
a table, a figure, the paper's claim it checks and a sentence on what was measured.
`experiments(scale, ...)` builds them for a `Scale`:

* `baselines`: MNIST at N = 16, 64, 125 for MAR-FL, FedAvg, AR-FL and RDFL, to the target;
* `churn`: N = 64, each aggregating peer dropping out with probability p;
* `mkd`: N = 64 without and with Moshpit Knowledge Distillation;
* `dp`: N = 64 without and with differential privacy at several noise multipliers;
* `text`: the text task (BBC News, embedded; 20 Newsgroups where its corpus is present);
* `network`: the baselines' runs on the simulated clock under peer link profiles;
* `codec`: N = 64 with and without momentum in the messages, for each message codec.

`SCALES["small"]` runs the MLP on the embedded MNIST (a 2-core CPU finishes it within the hour);
`SCALES["full"]` runs the paper's settings from `launch/configs/` (the CNN on the full MNIST).
`run_experiments` runs what its data allows (finished runs are reused, so an interrupted
reproduction picks up where it stopped) and `write_report` writes the Markdown report.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence

from marfl_jax import data, plotting, studies
from marfl_jax.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "launch", "configs")
EXPERIMENT_NAMES = ("baselines", "churn", "mkd", "dp", "text", "network", "codec")


@dataclasses.dataclass(frozen=True)
class Scale:
    """How large each experiment is.

    `mnist` is the shared MNIST setting (model, data, B, b, target, budget); with
    `paper_flagfiles` the MNIST runs at N take their setting from launch/configs/mnist_n{N}.cfg
    instead (dataset and data_dir still from `mnist`).
    """

    name: str
    mnist: Config
    peer_counts: tuple[int, ...] = (16, 64, 125)
    algorithms: tuple[str, ...] = ("marfl", "fedavg", "arfl", "rdfl")
    paper_flagfiles: bool = False
    study_peers: int = 64  # N of the churn, MKD and DP experiments.
    dropouts: tuple[float, ...] = (0.0, 0.2, 0.5)
    churn_algorithms: tuple[str, ...] = ("marfl", "fedavg", "rdfl")
    mkd_fractions: tuple[float, ...] = (0.4, 1.0)
    mkd_iterations: int = 8
    dp_noise_multipliers: tuple[float, ...] = (0.2, 0.5, 1.0)
    dp_iterations: int = 40
    text_max_iterations: int = 100  # BBC News.
    feature_dim: int = 768  # The frozen text encoder's output (the paper's DistilBERT: 768).
    newsgroups_peer_counts: tuple[int, ...] = (16,)
    newsgroups_max_iterations: int = 200
    network_profiles: tuple[str, ...] = ("uniform", "lognormal", "deadline")  # Of NETWORK_PROFILES.
    codecs: tuple[str, ...] = ("float32", "float16", "bfloat16", "int8")  # Of codec.CODECS.


SCALES = {
    "small": Scale(
        name="small",
        mnist=Config(model="mlp", dataset="mnist10k", local_batches=2, batch_size=16,
                     target_accuracy=0.9, max_iterations=60, eval_every=2, eval_peers="8",
                     checkpoint_every=0)),
    "full": Scale(
        name="full",
        mnist=Config(model="cnn", dataset="mnist", target_accuracy=0.95, max_iterations=500,
                     eval_every=5, eval_peers="8", checkpoint_every=25),
        paper_flagfiles=True,
        dropouts=(0.0, 0.1, 0.2, 0.5),
        dp_iterations=100,
        text_max_iterations=500,
        newsgroups_peer_counts=(16, 64, 125),
        newsgroups_max_iterations=1000),
}


@dataclasses.dataclass
class Experiment:
    """One of the paper's experiments: its runs and how to report them.

    Attributes:
      name: a short id, also the stem of its figure's file.
      title, claim, setting: the report's heading, the paper's claim it checks, and what was
        run (one paragraph each).
      configs: one Config per run (workdirs set).
      make_row: (config, RunResult) -> a dict, one per run.
      columns: (row key, column heading) pairs of the report's table.
      draw: (rows, curves, path) -> None, the figure; curves maps a run's label to its metrics.
      summarize: rows -> the sentence on what was measured.
      derive: rows -> None, adds columns that compare runs (None: nothing to add).
      data_flag: the launch.reproduce flag that supplies the experiment's data, named in the
        reason of a run left out for missing data.
      not_run: runs left out, as (what, why) pairs (missing data).
    """

    name: str
    title: str
    claim: str
    setting: str
    configs: list[Config]
    make_row: Callable
    columns: tuple[tuple[str, str], ...]
    draw: Callable[[list[dict], dict[str, list[dict]], str], None]
    summarize: Callable[[list[dict]], str]
    derive: Callable[[list[dict]], None] | None = None
    data_flag: str = "--data_dir"
    not_run: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Outcome:
    """What running an experiment gave: rows, the figure's path, seconds of all its runs."""

    experiment: Experiment
    rows: list[dict]
    figure: str | None
    run_seconds: float


# -- Settings ----------------------------------------------------------------------------------

def config_from_flagfile(path: str, **overrides) -> Config:
    """The Config a launch flagfile (`--name=value` lines, `#` comments) describes, with
    `overrides` applied on top. Unknown flags raise ValueError naming the file."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, value = line.removeprefix("--").partition("=")
            if name not in fields:
                raise ValueError(f"{path}: --{name} is not a flag of launch.train")
            default = fields[name].default
            values[name] = (value.lower() in ("1", "true") if isinstance(default, bool) else
                            type(default)(value))
    return Config(**{**values, **overrides})


def mnist_config(scale: Scale, num_peers: int, workdir: str) -> Config:
    """The MNIST setting at N peers: the paper's flagfile for N, or the scale's shared setting
    on `studies.moshpit_grid(N)`."""
    if scale.paper_flagfiles:
        return config_from_flagfile(
            os.path.join(CONFIG_DIR, f"mnist_n{num_peers}.cfg"), dataset=scale.mnist.dataset,
            data_dir=scale.mnist.data_dir, eval_peers=scale.mnist.eval_peers,
            checkpoint_every=scale.mnist.checkpoint_every, workdir=workdir)
    m, d, schedule = studies.moshpit_grid(num_peers)
    return dataclasses.replace(scale.mnist, num_peers=num_peers, group_size=m, key_dim=d,
                               schedule=schedule, workdir=workdir)


def describe(config: Config) -> str:
    """The setting of a run in one line of flags that matter."""
    return (f"`--dataset={config.dataset} --model={config.model} --batch_size="
            f"{config.batch_size} --local_batches={config.local_batches} "
            f"--target_accuracy={config.target_accuracy:g} --max_iterations="
            f"{config.max_iterations} --eval_every={config.eval_every}`")


def _set_of(values: Sequence[float]) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


# -- The experiments ---------------------------------------------------------------------------

def experiments(scale: Scale, workdir: str, names: Sequence[str] = EXPERIMENT_NAMES,
                text_data_dir: str = "") -> list[Experiment]:
    """The experiments `names` at `scale`, runs under `workdir`/<name>/."""
    makers = {"baselines": _baselines, "churn": _churn, "mkd": _mkd, "dp": _dp,
              "text": lambda s, w: _text(s, w, text_data_dir), "network": _network,
              "codec": _codec}
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"--experiments: unknown {', '.join(unknown)}; allowed: "
                         f"{', '.join(EXPERIMENT_NAMES)}")
    return [makers[name](scale, os.path.join(workdir, name)) for name in names]


RESULT_COLUMNS = (("iterations_to_target", "iterations to target"),
                  ("bytes_per_iteration", "bytes / iteration"),
                  ("bytes_to_target", "bytes to target"), ("final_accuracy", "final accuracy"))


def _baselines(scale: Scale, workdir: str) -> Experiment:
    configs = []
    for n in scale.peer_counts:
        base = mnist_config(scale, n, workdir)
        for name in scale.algorithms:
            configs.append(dataclasses.replace(
                base, algorithm=name, workdir=os.path.join(workdir, f"n{n}_{name}")).validate())
    first = configs[0]
    return Experiment(
        name="baselines",
        title="MAR-FL against FedAvg, AR-FL and RDFL on MNIST",
        claim=("MAR-FL matches the accuracy of centralized FedAvg and of the P2P baselines "
               "while its communication per iteration grows as O(N log N) instead of the "
               "O(N^2) of AR-FL and RDFL, so its advantage widens as N grows. Counting as the "
               "authors do, an AR-FL peer receives N-1 models per iteration and a MAR-FL peer "
               "G(M-1) (with momentum), e.g. (N-1)/(G(M-1)) = 10.3x fewer messages at N = 125, "
               "M = 5, G = 3."),
        setting=(f"N in {_set_of(scale.peer_counts)}, algorithms "
                 f"{', '.join(scale.algorithms)}; {describe(first)}; full participation, IID; "
                 "MAR-FL on a perfect Moshpit grid (16 = 4x4, 64 = 4x4x4, 125 = 5x5x5)."),
        configs=configs,
        make_row=studies.result_row,
        columns=(("num_peers", "N"), ("algorithm", "algorithm"), *RESULT_COLUMNS,
                 ("bytes_vs_marfl", "bytes to target / MAR-FL's")),
        draw=_draw_baselines,
        summarize=_summarize_baselines,
        derive=_add_bytes_vs_marfl)


def _churn(scale: Scale, workdir: str) -> Experiment:
    base = mnist_config(scale, scale.study_peers, workdir)
    configs = studies.churn_configs(base, scale.dropouts, scale.churn_algorithms)
    return Experiment(
        name="churn",
        title="Churn: peers dropping out of the aggregation",
        claim=("MAR-FL is robust to unreliable peers: with peers dropping out of the "
               "aggregation it keeps learning (absent peers keep their models and rejoin), "
               "unlike RDFL, whose relay ring breaks at absent peers."),
        setting=(f"N = {scale.study_peers}; each aggregating peer drops out with probability "
                 f"p in {_set_of(scale.dropouts)} for the whole "
                 f"aggregation; {', '.join(scale.churn_algorithms)}; {describe(base)}."),
        configs=configs,
        make_row=studies.result_row,
        columns=(("algorithm", "algorithm"), ("dropout", "dropout p"), *RESULT_COLUMNS),
        draw=lambda rows, curves, path: plotting.plot_churn(rows, path),
        summarize=_summarize_churn)


def _mkd(scale: Scale, workdir: str) -> Experiment:
    base = mnist_config(scale, scale.study_peers, workdir)
    base = dataclasses.replace(base, eval_every=1)  # Bytes to 50 % need every evaluation.
    configs = studies.mkd_configs(base, scale.mkd_fractions, scale.mkd_iterations)
    return Experiment(
        name="mkd",
        title="Moshpit Knowledge Distillation",
        claim=("Distilling from group mates in the first K iterations costs more per "
               "iteration (weights are exchanged once more: 1.5x the bytes of a plain "
               "iteration) but reaches the target accuracy with less communication in total."),
        setting=(f"MAR-FL, N = {scale.study_peers}; without MKD, and with MKD in the first "
                 f"K = {scale.mkd_iterations} iterations keeping the fraction rho in "
                 f"{_set_of(scale.mkd_fractions)} of the mates as "
                 f"teachers (tau = 3, 8 distillation batches); {describe(base)}, evaluated "
                 "every iteration."),
        configs=configs,
        make_row=studies.mkd_row,
        columns=(("run", "run"), ("iterations_to_50", "iterations to 50 %"),
                 ("bytes_to_50", "bytes to 50 %"),
                 ("iterations_to_target", "iterations to target"),
                 ("bytes_to_target", "bytes to target"), ("mkd_bytes", "MKD bytes"),
                 ("final_accuracy", "final accuracy")),
        draw=lambda rows, curves, path: plotting.plot_accuracy_vs_bytes(
            curves, path, (0.5, base.target_accuracy)),
        summarize=_summarize_mkd)


def _dp(scale: Scale, workdir: str) -> Experiment:
    base = dataclasses.replace(mnist_config(scale, scale.study_peers, workdir),
                               target_accuracy=1.0, max_iterations=scale.dp_iterations)
    configs = studies.dp_configs(base, scale.dp_noise_multipliers)
    return Experiment(
        name="dp",
        title="Differential privacy with adaptive clipping",
        claim=("Decentralized DP-FedAvg with adaptive clipping trades accuracy for privacy: "
               "more noise, a smaller epsilon, a lower accuracy. The authors bound epsilon with "
               "a closed-form RDP expression at a fixed order."),
        setting=(f"MAR-FL, N = {scale.study_peers}, {scale.dp_iterations} iterations, full "
                 "participation; without DP and with noise multiplier z in "
                 f"{_set_of(scale.dp_noise_multipliers)} (initial clip "
                 "0.1, target quantile 0.5, server lr 0.1, server momentum 0.9, delta = "
                 f"N^-1.1); {describe(base)}. Epsilon from dp-accounting's RDP and PLD "
                 "accountants, the authors' formula beside them."),
        configs=configs,
        make_row=studies.dp_row,
        columns=(("run", "run"), ("final_accuracy", "final accuracy"),
                 ("epsilon_rdp", "epsilon (RDP)"), ("epsilon_pld", "epsilon (PLD)"),
                 ("epsilon_authors", "epsilon (authors' formula)"),
                 ("cumulative_bytes", "bytes")),
        draw=lambda rows, curves, path: plotting.plot_accuracy_vs_iteration(curves, path),
        summarize=_summarize_dp)


def _text(scale: Scale, workdir: str, data_dir: str) -> Experiment:
    bbc = config_from_flagfile(os.path.join(CONFIG_DIR, "bbc_news.cfg"),
                               max_iterations=scale.text_max_iterations, checkpoint_every=0,
                               feature_dim=scale.feature_dim,
                               feature_cache=os.path.join(workdir, "features"),
                               workdir=os.path.join(workdir, "bbc_news_n16"))
    configs = [bbc.validate()]
    for n in scale.newsgroups_peer_counts:
        config = config_from_flagfile(
            os.path.join(CONFIG_DIR, f"20ng_n{n}.cfg"), data_dir=data_dir,
            max_iterations=scale.newsgroups_max_iterations, checkpoint_every=0,
            feature_dim=scale.feature_dim, feature_cache=os.path.join(workdir, "features"),
            workdir=os.path.join(workdir, f"20newsgroups_n{n}")).validate()
        configs.append(config)
    return Experiment(
        name="text",
        title="The text task: a head on frozen text features",
        claim=("On 20 Newsgroups the paper trains a 56,828-parameter head on frozen 768-d "
               "DistilBERT features and stops at 50 % accuracy; MAR-FL reaches it like the "
               "baselines with far fewer bytes."),
        setting=("BBC News (embedded, 5 classes, N = 16 on a 4x4 grid, target 95 %) and 20 "
                 f"Newsgroups (N in {_set_of(scale.newsgroups_peer_counts)}, "
                 "the settings of launch/configs/20ng_n*.cfg, target 50 %), both through the "
                 "frozen LSA encoder (TF-IDF + SVD to 768-d; not DistilBERT) and the paper's "
                 "head, MAR-FL."),
        configs=configs,
        make_row=_text_row,
        columns=(("dataset", "dataset"), ("num_peers", "N"), *RESULT_COLUMNS),
        draw=lambda rows, curves, path: plotting.plot_accuracy_vs_bytes(curves, path, (0.5,)),
        summarize=_summarize_text,
        data_flag="--text_data_dir")


def _text_row(config: Config, result) -> dict:
    return {"dataset": config.dataset, **studies.result_row(config, result),
            "target_accuracy": config.target_accuracy}


# -- What the rows say -------------------------------------------------------------------------

def _network(scale: Scale, workdir: str) -> Experiment:
    base = dataclasses.replace(mnist_config(scale, scale.peer_counts[0], workdir),
                               workdir=workdir)
    configs = studies.network_configs(base, scale.peer_counts, scale.algorithms,
                                      scale.network_profiles)
    return Experiment(
        name="network",
        title="Simulated time: the same runs on bandwidth-limited links",
        claim=("MAR-FL is designed for bandwidth-limited wireless networks with unreliable "
               "peers: exchanging with a few group mates per round instead of every peer "
               "should make it faster than AR-FL and RDFL where uplinks are the bottleneck. "
               "(The paper reports bytes, not time; this experiment is ours.)"),
        setting=(f"The runs of section 1 (N in {_set_of(scale.peer_counts)}, "
                 f"{', '.join(scale.algorithms)}; {describe(base)}) with the simulated clock "
                 "(`marfl_jax/clock.py`): `uniform` = every peer 10 Mbit/s up, 50 down, 50 ms, "
                 "100 examples/s, a 1 Gbit/s FedAvg server; `lognormal` = each rate log-normal "
                 "around those (sigma 1 for links, 0.5 for speed); `deadline` = lognormal with "
                 "a 30 s round deadline (`--round_timeout_s=30`), which cuts the slowest peers "
                 "off. Coordination: the authors' 5 s participation count per iteration and "
                 "50 ms DHT barriers."),
        configs=configs,
        make_row=studies.network_row,
        columns=(("profile", "profile"), ("num_peers", "N"), ("algorithm", "algorithm"),
                 ("iterations_to_target", "iterations to target"),
                 ("sim_seconds_to_target", "simulated s to target"),
                 ("sim_seconds_per_iteration", "simulated s / iteration"),
                 ("comm_share", "communication's share"),
                 ("stragglers_per_iteration", "stragglers / iteration"),
                 ("final_accuracy", "final accuracy")),
        draw=lambda rows, curves, path: plotting.plot_time_to_target(rows, path),
        summarize=_summarize_network)


def _codec(scale: Scale, workdir: str) -> Experiment:
    base = mnist_config(scale, scale.study_peers, workdir)
    configs = studies.codec_configs(base, scale.codecs)
    return Experiment(
        name="codec",
        title="What crosses the wire: momentum and message codecs",
        claim=("Transferring the momentum alongside the weights doubles the payload but is "
               "necessary for convergence stability. (The paper's design argument for MAR-FL's "
               "messages; the lossy codecs are ours, after the float16 and 8-bit codecs that "
               "hivemind offers for Moshpit averaging.)"),
        setting=(f"MAR-FL, N = {scale.study_peers}; messages with weights and momentum (the "
                 "authors') and with weights only (`--share_momentum=false`, each peer keeps "
                 f"its own momentum), each through the codecs {', '.join(scale.codecs)} "
                 "(`--codec`; int8 = blockwise absmax, one float32 scale per 4096 values); "
                 f"{describe(base)}. Each member averages its own exact copy with its mates' "
                 "decoded ones; bytes are the encoded sizes."),
        configs=configs,
        make_row=studies.codec_row,
        columns=(("run", "run"), ("payloads_per_message", "payloads / message"),
                 ("bytes_per_iteration", "bytes / iteration"),
                 ("iterations_to_target", "iterations to target"),
                 ("bytes_to_target", "bytes to target"), ("final_accuracy", "final accuracy")),
        draw=lambda rows, curves, path: plotting.plot_accuracy_vs_bytes(
            curves, path, (0.5, base.target_accuracy)),
        summarize=_summarize_codec)


def _summarize_codec(rows) -> str:
    """Weights only against momentum per codec, and each run's bytes to the target against the
    authors' (float32 with momentum)."""
    by_run = {(r["codec"], r["share_momentum"]): r for r in rows}
    parts = []
    for codec in dict.fromkeys(r["codec"] for r in rows):
        both, weights = by_run.get((codec, True)), by_run.get((codec, False))
        if both is None or weights is None:
            continue
        if weights["iterations_to_target"] == "":
            parts.append(f"{codec}: weights only missed the target "
                         f"({_pct(weights['final_accuracy'])} after {weights['iterations']} "
                         "iterations)" + ("." if both["iterations_to_target"] == "" else
                                          f"; with momentum it took "
                                          f"{both['iterations_to_target']} iterations."))
        elif both["iterations_to_target"] == "":
            parts.append(f"{codec}: weights only reached the target in "
                         f"{weights['iterations_to_target']} iterations; with momentum it was "
                         "missed.")
        else:
            parts.append(f"{codec}: weights only reached the target in "
                         f"{weights['iterations_to_target']} iterations against "
                         f"{both['iterations_to_target']} with momentum, with "
                         f"{weights['bytes_to_target'] / both['bytes_to_target']:.2f}x the "
                         "bytes.")
    authors = by_run.get(("float32", True))
    if authors and authors["bytes_to_target"] != "":
        cheapest = min((r for r in rows if r["bytes_to_target"] != ""),
                       key=lambda r: r["bytes_to_target"])
        parts.append(f"The fewest bytes to the target: {cheapest['run']}, "
                     f"{cheapest['bytes_to_target'] / authors['bytes_to_target']:.2f}x the "
                     "authors' float32 messages with momentum.")
    return " ".join(parts)


def _summarize_network(rows) -> str:
    largest = max(r["num_peers"] for r in rows)
    parts = []
    for profile in dict.fromkeys(r["profile"] for r in rows):
        mine = {r["algorithm"]: r for r in rows
                if r["profile"] == profile and r["num_peers"] == largest}
        marfl = mine.get("marfl", {}).get("sim_seconds_to_target", "")
        if marfl == "":
            parts.append(f"`{profile}`, N = {largest}: MAR-FL missed the target.")
            continue
        others = [f"{name} {r['sim_seconds_to_target'] / marfl:.2f}x" if
                  r["sim_seconds_to_target"] != "" else f"{name} never (target missed)"
                  for name, r in mine.items() if name != "marfl"]
        parts.append(f"`{profile}`, N = {largest}: MAR-FL reached the target in "
                     f"{marfl / 3600:.2f} simulated hours; the others' time as a multiple of "
                     f"MAR-FL's: {', '.join(others)}.")
    return " ".join(parts)


def _draw_baselines(rows, curves, path):
    plotting.plot_bytes_per_iteration(rows, path)
    largest = max(r["num_peers"] for r in rows)
    plotting.plot_accuracy_vs_bytes(
        {label: m for label, m in curves.items() if label.startswith(f"n{largest}_")},
        path.replace(".png", f"_accuracy_n{largest}.png"), (0.5,))


def _growth(rows, name) -> float | None:
    """The exponent k of bytes per iteration ~ N^k between the smallest and largest N."""
    points = sorted((r["num_peers"], r["bytes_per_iteration"]) for r in rows
                    if r["algorithm"] == name)
    if len(points) < 2 or points[0][0] == points[-1][0]:
        return None
    (n0, b0), (n1, b1) = points[0], points[-1]
    return math.log(b1 / b0) / math.log(n1 / n0)


def _add_bytes_vs_marfl(rows) -> None:
    """Each row's bytes to the target over MAR-FL's at the same N ('' where either missed)."""
    marfl = {r["num_peers"]: r["bytes_to_target"] for r in rows if r["algorithm"] == "marfl"}
    for r in rows:
        mine = marfl.get(r["num_peers"], "")
        r["bytes_vs_marfl"] = ("" if "" in (mine, r["bytes_to_target"]) or not mine
                               else r["bytes_to_target"] / mine)


def _summarize_baselines(rows) -> str:
    parts = []
    largest = max(r["num_peers"] for r in rows)
    at_largest = [r for r in rows if r["num_peers"] == largest]
    reached = [r for r in at_largest if r["reached_target"]]
    if at_largest:
        low, high = (f(r["final_accuracy"] for r in at_largest) for f in (min, max))
        parts.append(f"At N = {largest}, {len(reached)} of {len(at_largest)} algorithms reached "
                     "the target; " + (
                         f"all ended at the same accuracy, {_pct(low)} (at full participation "
                         "every one of them averages exactly, so the models are the same and "
                         "only the bytes differ)." if low == high else
                         f"final accuracies span {_pct(low)} to {_pct(high)}."))
    for r in at_largest:
        if r["algorithm"] != "marfl" and r.get("bytes_vs_marfl", "") != "":
            parts.append(f"{r['algorithm']} needed {r['bytes_vs_marfl']:.2f}x MAR-FL's bytes to "
                         "the target.")
    growth = {name: _growth(rows, name) for name in sorted({r["algorithm"] for r in rows})}
    shown = [f"{name} N^{k:.2f}" for name, k in growth.items() if k is not None]
    if shown:
        smallest = min(r["num_peers"] for r in rows)
        n_log_n = (math.log(largest * math.log(largest) / (smallest * math.log(smallest)))
                   / math.log(largest / smallest))
        parts.append(f"Bytes per iteration grew as {', '.join(shown)} between N = {smallest} "
                     f"and {largest} (N log N would be N^{n_log_n:.2f} over this range).")
    return " ".join(parts)


def _summarize_churn(rows) -> str:
    parts = []
    for name in sorted({r["algorithm"] for r in rows}):
        mine = sorted((r for r in rows if r["algorithm"] == name), key=lambda r: r["dropout"])
        first, last = mine[0], mine[-1]
        parts.append(f"{name}: {_pct(first['final_accuracy'])} at p = {first['dropout']:g}, "
                     f"{_pct(last['final_accuracy'])} at p = {last['dropout']:g} "
                     f"(target {'reached' if last['reached_target'] else 'not reached'} "
                     f"at p = {last['dropout']:g}).")
    return " ".join(parts)


def _summarize_mkd(rows) -> str:
    plain = next((r for r in rows if not r["mkd"]), None)
    parts = []
    for r in rows:
        if not r["mkd"]:
            continue
        if plain and plain["bytes_to_target"] != "" and r["bytes_to_target"] != "":
            change = r["bytes_to_target"] / plain["bytes_to_target"] - 1
            parts.append(f"MKD with rho = {r['mkd_teacher_fraction']:g} reached the target "
                         f"after {r['iterations_to_target']} iterations instead of "
                         f"{plain['iterations_to_target']}, with {change:+.1%} bytes.")
        else:
            parts.append(f"MKD with rho = {r['mkd_teacher_fraction']:g}: the target was not "
                         "reached by both runs, so no bytes-to-target comparison.")
    return " ".join(parts)


def _summarize_dp(rows) -> str:
    plain = next((r for r in rows if not r["dp"]), None)
    parts = [f"Without DP: {_pct(plain['final_accuracy'])}." if plain else ""]
    for r in rows:
        if r["dp"]:
            parts.append(f"z = {r['noise_multiplier']:g}: {_pct(r['final_accuracy'])}, "
                         f"epsilon {_num(r['epsilon_rdp'])} (RDP) / {_num(r['epsilon_pld'])} "
                         f"(PLD) / {_num(r['epsilon_authors'])} (authors' formula).")
    return " ".join(p for p in parts if p)


def _summarize_text(rows) -> str:
    return " ".join(
        f"{r['dataset']} (N = {r['num_peers']}): {_pct(r['final_accuracy'])} after "
        f"{r['iterations']} iterations, target {_pct(r['target_accuracy'])} "
        + (f"reached at iteration {r['iterations_to_target']} with {_gb(r['bytes_to_target'])}."
           if r["reached_target"] else "not reached.") for r in rows)


# -- Running -----------------------------------------------------------------------------------

def data_missing(config: Config) -> str | None:
    """Why `config`'s dataset cannot be loaded here (the loader's message), or None. Probed once
    per dataset setting in a process, however many experiments use it."""
    return _probe(config.dataset, config.data_dir, config.encoder, config.features,
                  config.feature_dim, config.feature_cache)


@functools.cache
def _probe(dataset, data_dir, encoder, features, feature_dim, feature_cache) -> str | None:
    try:
        data.load_dataset(dataset, data_dir or None, encoder=encoder, features=features,
                          feature_dim=feature_dim, feature_cache=feature_cache or None)
    except data.DataUnavailableError as error:
        return str(error)
    return None


def run_experiment(experiment: Experiment, figure_dir: str, on_row=None) -> Outcome:
    """Runs (or reuses) the experiment's runs whose data is present, draws its figure into
    figure_dir/<name>.png. Runs whose data is missing move to `experiment.not_run`."""
    missing = {}
    for config in experiment.configs:
        key = (config.dataset, config.data_dir)
        if key not in missing:
            missing[key] = data_missing(config)
    runnable = []
    for config in experiment.configs:
        reason = missing[(config.dataset, config.data_dir)]
        if reason is None:
            runnable.append(config)
        else:
            if experiment.data_flag != "--data_dir":
                reason += f"\n(launch.reproduce: give the data with {experiment.data_flag}.)"
            experiment.not_run.append((os.path.basename(config.workdir), reason))
    curves = {}
    rows = studies.run_study(
        runnable, on_row=on_row, make_row=experiment.make_row,
        on_result=lambda c, r: curves.update({os.path.basename(c.workdir): r.metrics}))
    figure = None
    if rows:
        if experiment.derive is not None:
            experiment.derive(rows)
        os.makedirs(figure_dir, exist_ok=True)
        figure = os.path.join(figure_dir, f"{experiment.name}.png")
        experiment.draw(rows, curves, figure)
    return Outcome(experiment, rows, figure, sum(r["wall_seconds"] for r in rows))


# -- The report --------------------------------------------------------------------------------

def _pct(value) -> str:
    return "-" if value in ("", None) else f"{100 * value:.2f} %"


def _gb(value) -> str:
    return "-" if value in ("", None) else f"{value / 1e9:,.2f} GB"


def _num(value) -> str:
    if value in ("", None):
        return "-"
    return "inf" if value == math.inf else f"{value:,.4g}"


def _cell(key: str, value) -> str:
    if value in ("", None):
        return "-"
    if key in ("bytes_per_iteration", "bytes_to_target", "bytes_to_50", "mkd_bytes",
               "cumulative_bytes"):
        return _gb(value)
    if "accuracy" in key:
        return _pct(value)
    if key == "bytes_vs_marfl":
        return f"{value:.2f}x"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _num(value)
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(heading for _, heading in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(key, row.get(key, "")) for key, _ in columns) + " |"
              for row in rows]
    return "\n".join(lines)


def write_report(outcomes: Sequence[Outcome], path: str, *, scale: Scale, command: str,
                 machine: str, wall_seconds: float) -> None:
    """Writes the Markdown report to `path` (figures linked relative to it)."""
    here = os.path.dirname(os.path.abspath(path))
    lines = [
        "# Reproducing the MAR-FL paper",
        "",
        "Mulitze, Woisetschläger, Jacobsen: \"MAR-FL: A Communication Efficient Peer-to-Peer "
        "Federated Learning System\", arXiv 2512.05234 (NeurIPS 2025 AI4NextG workshop).",
        "",
        f"Written by `{command}` (scale `{scale.name}`) on {machine}, "
        f"{time.strftime('%Y-%m-%d')}; {_duration(wall_seconds)} of wall time for this "
        "invocation (runs finished earlier in the same workdir are reused and their own "
        "times are listed per experiment). One seed per run. Every figure below was measured "
        "by that command. The paper's claims are paraphrased from its abstract and its "
        "description of the algorithms; its own tables were not reachable from this offline "
        "machine, so no number of the paper's is copied here beside ours. Bytes are what "
        "would cross the network, counted as the authors count them (each peer receives "
        "|g|-1 messages of weights and momentum per round).",
        "",
    ]
    not_run = [run for o in outcomes for run in o.experiment.not_run]
    for number, outcome in enumerate(outcomes, 1):
        experiment = outcome.experiment
        lines += [f"## {number}. {experiment.title}", "",
                  f"**The paper's claim.** {experiment.claim}", "",
                  f"**Setting.** {experiment.setting}", ""]
        if outcome.rows:
            runs = f"{len(outcome.rows)} run{'s' if len(outcome.rows) > 1 else ''}"
            lines += [f"**Measured** ({runs}, "
                      f"{_duration(outcome.run_seconds)} of run time). "
                      f"{experiment.summarize(outcome.rows)}", "",
                      markdown_table(outcome.rows, experiment.columns), ""]
        else:
            lines += ["**Measured.** Nothing: no run of this experiment could start here.", ""]
        if outcome.figure:
            figures = [outcome.figure] + sorted(
                os.path.join(os.path.dirname(outcome.figure), f)
                for f in os.listdir(os.path.dirname(outcome.figure))
                if f.startswith(f"{experiment.name}_") and f.endswith(".png"))
            lines += [f"![{experiment.title}]({os.path.relpath(f, here)})" for f in figures]
            lines.append("")
        for whats, why in _by_reason(experiment.not_run):
            lines += [f"**Not run:** {whats}, because:", "", _quoted(why), ""]
    lines += ["## Not run", ""]
    lines += ([f"- {o.experiment.title}: {whats}" for o in outcomes
               for whats, _ in _by_reason(o.experiment.not_run)] if not_run else
              ["Every run of this scale ran."])
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _by_reason(not_run: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(the runs left out for one reason, as `a`, `b`, ...; that reason), in first-seen order."""
    grouped: dict[str, list[str]] = {}
    for what, why in not_run:
        grouped.setdefault(why, []).append(f"`{what}`")
    return [(", ".join(whats), why) for why, whats in grouped.items()]


def _quoted(text: str) -> str:
    return "\n".join("> " + line if line else ">" for line in text.splitlines())


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"
