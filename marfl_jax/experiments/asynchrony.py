"""What the barrier costs: synchronous against asynchronous MAR-FL (`--asynchronous`), and
gossip, on heterogeneous peers; simulated seconds and bytes to the target, the staleness and
the wave sizes asynchrony brings (ours: the paper runs behind barriers only).

    python -m launch.compare --study=asynchrony      # MLP N=64, 1024; paper CNN N=64
    python -m launch.compare --study=asynchrony --option=setups=mlp@64   # ~10 minutes on 2 cores

Settings (`--option=NAME=V1,V2`, `STUDY.options`): `setups` (model@N, default mlp@64,
mlp@1024, cnn@64), `profiles` (the peers, default sigma0, sigma0.5, sigma1 -- log-normal links
with `--compute_sigma` 0, 0.5, 1 -- and slow10, a trace where 10 % of the peers train and send
10x slower), `modes` (sync_marfl, async_marfl, sync_gossip, async_gossip), `window_s`
(--matchmaking_window_s, 2) and `row_every_s` (10). Every run evaluates at every row (every
iteration when synchronous). Writes `asynchrony.csv` and `asynchrony.png` (accuracy against
simulated seconds, a panel per setup and profile).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from marfl_jax.config import Config
from marfl_jax.scales import mnist_config, moshpit_grid
from marfl_jax.sweep import Option, Study

PROFILES = {
    "sigma0": dict(network="lognormal", compute_sigma=0.0),
    "sigma0.5": dict(network="lognormal", compute_sigma=0.5),
    "sigma1": dict(network="lognormal", compute_sigma=1.0),
    "slow10": dict(network="trace"),  # SLOW_FRACTION of the peers SLOWDOWN x slower.
}
MODES = {
    "sync_marfl": dict(algorithm="marfl", asynchronous=False),
    "async_marfl": dict(algorithm="marfl", asynchronous=True),
    "sync_gossip": dict(algorithm="gossip", asynchronous=False),
    "async_gossip": dict(algorithm="gossip", asynchronous=True),
}
SLOW_FRACTION, SLOWDOWN = 0.1, 10.0
FIELDS = ("setup", "profile", "mode", "num_peers", "model", "sim_seconds_to_target",
          "bytes_to_target", "local_phases_to_target", "final_accuracy", "rows",
          "wave_size_mean", "staleness_mean", "staleness_max", "alone_share", "wall_seconds")


def slow_trace(path: str, num_peers: int, config: Config, seed: int = 0) -> str:
    """A trace CSV where a random SLOW_FRACTION of the peers (seeded) have links and speed
    SLOWDOWN x below the defaults of `config` (`--uplink_mbps`, ...); the others have them."""
    rng = np.random.default_rng([seed, num_peers])
    slow = np.zeros(num_peers, bool)
    slow[rng.permutation(num_peers)[:math.ceil(SLOW_FRACTION * num_peers)]] = True
    factor = np.where(slow, 1.0 / SLOWDOWN, 1.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("uplink_mbps,downlink_mbps,latency_ms,examples_per_s\n")
        for x in factor:
            f.write(f"{config.uplink_mbps * x:.6g},{config.downlink_mbps * x:.6g},"
                    f"{config.latency_ms:.6g},{config.examples_per_s * x:.6g}\n")
    return path


def run_name(setup: str, profile: str, mode: str) -> str:
    """A run's workdir name (and its curve's key): `mlp_n64__sigma1__async_marfl`."""
    return "__".join((setup.replace("@", "_n"), profile, mode))


def setup_of(text: str) -> tuple[str, int]:
    model, _, n = text.partition("@")
    if not n.isdigit() or not model:
        raise ValueError(f"a setup is MODEL@N (e.g. mlp@64), not {text!r}")
    return model, int(n)


OPTIONS = {
    "setups": Option(("mlp@64", "mlp@1024", "cnn@64"), str, "model@N of each run group"),
    "profiles": Option(tuple(PROFILES), str, f"the peers ({', '.join(PROFILES)})"),
    "modes": Option(tuple(MODES), str, f"what runs ({', '.join(MODES)})"),
    "window_s": Option(2.0, float, "--matchmaking_window_s of the asynchronous runs"),
    "row_every_s": Option(10.0, float, "--row_every_s of the asynchronous runs"),
}


def configs(scale, workdir) -> list[Config]:
    options = STUDY.options_of(scale)
    for name, allowed in (("profiles", PROFILES), ("modes", MODES)):
        unknown = [v for v in getattr(options, name) if v not in allowed]
        if unknown:
            raise ValueError(f"--option={name}: unknown {', '.join(unknown)}; allowed: "
                             f"{', '.join(allowed)}")
    runs = []
    for setup in options.setups:
        model, n = setup_of(setup)
        m, d, schedule = moshpit_grid(n)
        for profile in options.profiles:
            for mode in options.modes:
                base = mnist_config(scale, n, workdir)
                config = dataclasses.replace(
                    base, model=model, group_size=m, key_dim=d, schedule=schedule,
                    eval_every=1, matchmaking_window_s=options.window_s,
                    row_every_s=options.row_every_s,
                    workdir=os.path.join(workdir, run_name(setup, profile, mode)),
                    **PROFILES[profile], **MODES[mode])
                if config.asynchronous:  # One timeline per run: replicas are refused.
                    config = dataclasses.replace(config, replicas=1)
                if profile == "slow10":
                    config = dataclasses.replace(config, network_trace=slow_trace(
                        os.path.join(workdir, "traces", f"slow10_n{n}.csv"), n, config))
                runs.append(config.validate())
    return runs


def row(config: Config, result) -> dict:
    summary, metrics = result.summary, result.metrics
    reached = summary["iteration_reached_target"]
    at = metrics[reached] if reached is not None else None
    asynchronous = config.asynchronous
    phases = (at.get("cumulative_local_phases") if asynchronous else
              sum(r["updating_peers"] for r in metrics[:reached + 1])) if at else ""
    setup, profile, mode = os.path.basename(os.path.normpath(config.workdir)).split("__")

    def mean(field):
        values = [r[field] for r in metrics if field in r and r.get("groups", 1)]
        return round(float(np.mean(values)), 3) if values else ""

    groups = sum(r.get("groups", 0) for r in metrics)
    alone = sum(r.get("alone", 0) for r in metrics)
    return {
        "setup": setup.replace("_n", "@"), "profile": profile, "mode": mode,
        "num_peers": config.num_peers, "model": config.model,
        "sim_seconds_to_target": "" if at is None else round(at["cumulative_sim_seconds"], 1),
        "bytes_to_target": "" if at is None else at["cumulative_bytes"],
        "local_phases_to_target": phases,
        "final_accuracy": summary["final_accuracy"], "rows": len(metrics),
        "wave_size_mean": mean("wave_size_mean") if asynchronous else "",
        "staleness_mean": mean("staleness_mean") if asynchronous else "",
        "staleness_max": (max(r["staleness_max"] for r in metrics) if asynchronous else ""),
        "alone_share": (round(alone / max(alone + groups, 1), 3) if asynchronous else ""),
        "wall_seconds": summary["wall_seconds"],
    }


def draw(rows, curves, configs, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from marfl_jax import plotting

    panels = list(dict.fromkeys((r["setup"], r["profile"]) for r in rows))
    columns = min(4, len(panels))
    lines = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines),
                             squeeze=False)
    for ax, (setup, profile) in zip(axes.flat, panels, strict=False):
        for r in rows:
            if (r["setup"], r["profile"]) != (setup, profile):
                continue
            metrics = curves.get(run_name(setup, profile, r["mode"]), [])
            evaluated = [m for m in metrics if "accuracy" in m]
            plotting.accuracy_curve(ax, [m["cumulative_sim_seconds"] for m in evaluated],
                                    evaluated, label=r["mode"].replace("_", " "))
        ax.set(title=f"{setup}, {profile}", xlabel="simulated seconds", ylabel="test accuracy",
               xscale="log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def setting(scale, configs) -> str:
    first = configs[0]
    setups = ", ".join(dict.fromkeys(f"{c.model} N = {c.num_peers}" for c in configs))
    return (f"{setups}; b = {first.local_batches}, B = {first.batch_size}, target "
            f"{first.target_accuracy:.0%}, at most {first.max_iterations} iterations (the "
            "asynchronous runs: as many local phases), evaluated every iteration or row. Peers: "
            "`sigma0` / `sigma0.5` / `sigma1` = `--network=lognormal` (links log-normal with "
            "sigma 1 around 10 Mbit/s up, 50 down) with `--compute_sigma` 0 / 0.5 / 1 around 100 "
            "examples/s; `slow10` = a trace where 10 % of the peers have a tenth of the links "
            "and speed. Synchronous runs wait at the authors' barriers; asynchronous ones "
            f"(`--asynchronous`) use a {first.matchmaking_window_s:g} s matchmaking window and "
            f"rows every {first.row_every_s:g} simulated s; gossip pairs ready peers.")


def summarize(rows) -> str:
    parts = []
    for setup, profile in dict.fromkeys((r["setup"], r["profile"]) for r in rows):
        mine = {r["mode"]: r for r in rows if (r["setup"], r["profile"]) == (setup, profile)}
        sync, asyn = mine.get("sync_marfl"), mine.get("async_marfl")
        if not sync or not asyn:
            continue
        s, a = sync["sim_seconds_to_target"], asyn["sim_seconds_to_target"]
        if s == "" or a == "":
            parts.append(f"{setup} {profile}: {'synchronous' if s == '' else 'asynchronous'} "
                         "MAR-FL missed the target.")
            continue
        parts.append(f"{setup} {profile}: asynchronous MAR-FL reached the target in "
                     f"{a:.0f} simulated s against {s:.0f} s synchronous ({s / a:.2f}x), "
                     f"staleness {asyn['staleness_mean']} (max {asyn['staleness_max']}), "
                     f"{asyn['alone_share']:.0%} of windows without a mate.")
    return " ".join(parts)


STUDY = Study(
    name="asynchrony",
    configs=configs,
    options=OPTIONS,
    make_row=row,
    fields=FIELDS,
    draw=draw,
    section=9,
    setting=setting,
    title="Beyond the paper: asynchronous Moshpit, no global barrier",
    claim=("Not the paper's: MAR-FL as its authors run it waits at global barriers for every "
           "peer; Moshpit SGD is asynchronous. What does the barrier cost in simulated time "
           "to accuracy, and what does asynchrony cost in staleness?"),
    columns=(("setup", "setup"), ("profile", "peers"), ("mode", "run"),
             ("sim_seconds_to_target", "simulated s to target"),
             ("bytes_to_target", "bytes to target"),
             ("final_accuracy", "final accuracy"), ("wave_size_mean", "wave size"),
             ("staleness_mean", "staleness"), ("staleness_max", "max staleness"),
             ("alone_share", "windows alone")),
    summarize=summarize)
