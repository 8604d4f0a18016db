"""Byzantine peers: honest accuracy after a fixed number of iterations, for fractions of attackers
x attacks x group rules x algorithms x placement (what small Moshpit groups buy, or cost,
against the server's single robust aggregate; section 8 of the reproduction, beyond the paper).

    python -m launch.compare --study=byzantine                    # the whole grid (long)
    python -m launch.compare --study=byzantine --option=algorithms=marfl,fedavg \\
        --option=fractions=0,0.1,0.2 --option=attacks=sign_flip,alie,label_flip   # results/
    python -m launch.reproduce --experiments=byzantine  # the scale's grid (small: sign_flip)
    python -m launch.compare --study=byzantine --replicas=3 --option=group_sizes=0,8 \
        --option=fractions=0,0.1,0.2,0.3 --option=attacks=sign_flip,alie \
        --option=rules=mean,trimmed_mean,self_centered_clip --option=placements=random \
        --option=noniid_alphas=0.1,0.5 --option=iterations=20   # results/byzantine_replicas

Settings (`--option=NAME=V1,V2`, `STUDY.options`): `fractions` (default 0, 5, ..., 30 %),
`attacks` (sign_flip, gaussian, alie, ipm, label_flip; any of `marfl_jax.attacks.ATTACKS`),
`rules` (mean, median, trimmed_mean, centered_clip, self_centered_clip; any of
`marfl_jax.rules.RULES`, krum too), `placements` (random, collude; for algorithms whose groups
come from keys, MAR-FL: a server's one group or random pairs leave colluders no key to
choose), `algorithms` (marfl, fedavg, gossip), `group_sizes` (MAR-FL's M; 0 = N's grid, 4 at
N = 64; 8 runs the 8x8 grid beside it), `noniid_alphas` (extra runs without attackers on
Dirichlet(alpha) data, every setup and rule: what a robust rule costs honest peers whose data
differ) and `iterations` (default: the shared `--max_iterations`, 30 here: every run takes them
all, no target); N is `--churn_peers` (64), the model `--model`; `--replicas=R` gives every
cell R seeds (mean ± std). Each run's rule tolerates
f = max(1, ceil(fraction * M)) copies (M its largest group, at most (M - 1) // 2;
`rules.auto_f`, what --aggregator_f=auto gives, set explicitly): what a group of M holds at that
fraction on average, as a defender sizing the rule would assume; centered clipping uses tau = 1
and 3 iterations. Accuracy is over the honest peers only. Writes
`byzantine.csv` and `byzantine.png` (a heat map per attack and fraction: honest final accuracy
for each algorithm and placement x rule). The report's tables: without attackers, the honest
accuracy with the worst honest peer's (`accuracy_min` over every honest peer) and the consensus
distance, per data partition; the breakdown points (`breakdown_points`: the largest fraction
that ran up to which the honest accuracy stays within 5 points of the same rule's without
attackers); one table per attack and fraction. They show every rule, attack, fraction, setup
and placement that ran.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence

from marfl_jax import assemble
from marfl_jax import rules as rules_lib
from marfl_jax.config import Config
from marfl_jax.report import describe, pct, set_of
from marfl_jax.scales import mnist_config, moshpit_grid
from marfl_jax.sweep import Option, Study

FRACTIONS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
ATTACKS = ("sign_flip", "gaussian", "alie", "ipm", "label_flip")
RULES = ("mean", "median", "trimmed_mean", "centered_clip", "self_centered_clip")
PLACEMENTS = ("random", "collude")
CLIP = dict(clip_tau=1.0, clip_iterations=3)
# A fraction is tolerated while the honest accuracy stays within this of the rule's own
# accuracy without attackers (the breakdown table).
BREAKDOWN_POINTS = 0.05
FIELDS = ("setup", "algorithm", "placement", "partition", "fraction", "byzantine_peers",
          "attack", "rule", "aggregator_f", "group_size", "iterations", "final_accuracy",
          "accuracy_min", "accuracy_max", "consensus_after", "diverged", "bytes",
          "wall_seconds")
OPTIONS = {
    "fractions": Option(FRACTIONS, float, "fractions of the peers that attack (0: none)"),
    "attacks": Option(ATTACKS, str, "the attacks (marfl_jax.attacks.ATTACKS)"),
    "rules": Option(RULES, str, "the group rules (marfl_jax.rules.RULES)"),
    "placements": Option(PLACEMENTS, str, "where attackers sit, for algorithms with keys "
                         "(marfl_jax.adversary.PLACEMENTS)"),
    "algorithms": Option(("marfl", "fedavg", "gossip"), str, "the algorithms"),
    "group_sizes": Option((0,), int, "MAR-FL's group sizes M (0: the grid of N's "
                          "moshpit_grid; 8 at N = 64 is the 8x8 grid)"),
    "noniid_alphas": Option((), float, "Dirichlet alphas of extra runs without attackers "
                            "(--partition=dirichlet), every algorithm and rule"),
    "iterations": Option(None, int, "each run's iterations (default: the shared setting's "
                         "max_iterations)"),
}


def setup_name(config: Config) -> str:
    """The algorithm, with MAR-FL's group size M where it is not N's `moshpit_grid`."""
    if config.algorithm == "marfl" and config.group_size != moshpit_grid(config.num_peers)[0]:
        return f"marfl_m{config.group_size}"
    return config.algorithm


def applies(rule: str, base: Config, algorithm: str) -> bool:
    """Whether the study runs `rule` for `algorithm`: not a per-member rule (each member clips
    its mates' copies around its own) at a server, which holds no copy of its own."""
    server = assemble.algorithm(dataclasses.replace(base, algorithm=algorithm)).wire == "star"
    return not (server and rules_lib.RULES.get(rule).per_member)


def one_run(base: Config, algorithm: str, placement: str, fraction: float, attack: str,
            rule: str, alpha: float | None = None) -> Config:
    setup = setup_name(dataclasses.replace(base, algorithm=algorithm))
    name = (f"{setup}_{placement}_f{fraction:g}_{attack}_{rule}" if fraction
            else f"{setup}_honest_{rule}" if alpha is None
            else f"{setup}_dirichlet{alpha:g}_{rule}")
    if alpha is not None:
        base = dataclasses.replace(base, partition="dirichlet", dirichlet_alpha=alpha)
    config = dataclasses.replace(
        base, algorithm=algorithm, byzantine_fraction=fraction,
        byzantine_placement=placement if fraction else "random",
        attack=attack if fraction else "none", aggregator=rule,
        workdir=os.path.join(base.workdir, name),
        **(CLIP if rules_lib.RULES.get(rule).clips else {}))
    # f as --aggregator_f=auto gives it, set explicitly: the rows and workdirs name a number.
    f = rules_lib.auto_f(fraction, assemble.algorithm(config).max_group_size)
    return dataclasses.replace(config, aggregator_f=f).validate()


def configs(scale, workdir):
    options = STUDY.options_of(scale)
    n = scale.study_peers
    m, d, schedule = moshpit_grid(n)
    base = dataclasses.replace(mnist_config(scale, n, workdir), group_size=m, key_dim=d,
                               schedule=schedule, target_accuracy=1.0, eval_every=10)
    if options.iterations is not None:
        base = dataclasses.replace(base, max_iterations=options.iterations)
    setups = []  # (base, algorithm): MAR-FL once per group size.
    for algorithm in options.algorithms:
        if algorithm != "marfl":
            setups.append((base, algorithm))
            continue
        for size in options.group_sizes:
            size = size or m
            dims = round(math.log(n, size))
            if size ** dims != n:
                raise ValueError(f"--option=group_sizes={size}: N = {n} is not a power of it "
                                 "(MAR-FL's groups form a grid of N)")
            setups.append((dataclasses.replace(base, group_size=size, key_dim=dims,
                                               schedule=schedule if size == m else "authors"),
                           algorithm))
    runs = []
    for fraction in options.fractions:
        if fraction and options.noniid_alphas and not any(
                c.partition == "dirichlet" for c in runs):  # Without attackers first.
            runs += noniid_runs(setups, options)
        for attack in options.attacks if fraction else ("none",):
            for setup, algorithm in setups:
                keyed = assemble.algorithm(
                    dataclasses.replace(setup, algorithm=algorithm)).group_keys
                places = (options.placements if fraction and keyed
                          else ("random",))  # Colluders choose keys; others have none.
                for placement in places:
                    runs += [one_run(setup, algorithm, placement, fraction, attack, rule)
                             for rule in options.rules if applies(rule, setup, algorithm)]
    if not any(c.partition == "dirichlet" for c in runs):
        runs += noniid_runs(setups, options)
    return runs


def noniid_runs(setups, options) -> list[Config]:
    """Every setup and rule without attackers on Dirichlet data, per alpha."""
    return [one_run(setup, algorithm, "random", 0.0, "none", rule, alpha)
            for alpha in options.noniid_alphas for setup, algorithm in setups
            for rule in options.rules if applies(rule, setup, algorithm)]


def make_row(config: Config, result) -> dict:
    summary, metrics = result.summary, result.metrics
    largest = assemble.algorithm(config).max_group_size
    evaluated = [r for r in metrics if r.get("accuracy") is not None]
    last = evaluated[-1] if evaluated else {}
    spread = {f"{name}_std": last[f"{name}_std"] for name in ("accuracy_min", "accuracy_max")
              if f"{name}_std" in last}  # Replicas.
    if metrics and "consensus_after_std" in metrics[-1]:
        spread["consensus_after_std"] = metrics[-1]["consensus_after_std"]
    return {
        "setup": setup_name(config), "algorithm": config.algorithm,
        "placement": config.byzantine_placement,
        "partition": ("iid" if config.partition != "dirichlet"
                      else f"dirichlet {config.dirichlet_alpha:g}"),
        "fraction": config.byzantine_fraction,
        "byzantine_peers": metrics[-1].get("byzantine_peers", 0) if metrics else 0,
        "attack": config.attack, "rule": config.aggregator,
        "aggregator_f": config.tolerated_f(largest), "group_size": largest,
        "iterations": summary["iterations"], "final_accuracy": summary["final_accuracy"],
        "accuracy_min": last.get("accuracy_min", ""), "accuracy_max": last.get("accuracy_max", ""),
        "consensus_after": metrics[-1]["consensus_after"] if metrics else "",
        "diverged": "diverged" in summary, "bytes": summary["cumulative_bytes"],
        "wall_seconds": summary["wall_seconds"], **spread}


def ordered(values: Iterable, known: Sequence = ()) -> list:
    """Each of `values` once: those in `known` in its order, then the others as first seen."""
    seen = list(dict.fromkeys(values))
    return [v for v in known if v in seen] + [v for v in seen if v not in known]


def rules_of(rows) -> list[str]:
    """The rules that ran, RULES' first."""
    return ordered((r["rule"] for r in rows), RULES)


def setup_of(row) -> str:
    """The row's setup (rows of before setups existed: the algorithm)."""
    return row.get("setup") or row["algorithm"]


def iid(row) -> bool:
    return row.get("partition", "iid") == "iid"


def lines_of(rows) -> list[tuple[str, str]]:
    """The (setup, placement) pairs that ran."""
    return sorted({(setup_of(r), r["placement"]) for r in rows})


def panels_of(rows) -> list[tuple[str, float]]:
    """The (attack, fraction) pairs that ran with attackers: by attack (ATTACKS' first), then
    fraction."""
    attacked = [r for r in rows if r["fraction"] and iid(r)]
    return [(attack, fraction) for attack in ordered((r["attack"] for r in attacked), ATTACKS)
            for fraction in sorted({r["fraction"] for r in attacked if r["attack"] == attack})]


def _cell(rows, fraction, attack, setup, placement, rule) -> dict | None:
    return next((r for r in rows if iid(r) and (r["fraction"], r["attack"], setup_of(r),
                                                r["placement"], r["rule"])
                 == (fraction, attack, setup, placement, rule)), None)


def _honest(rows, setup, rule, partition="iid") -> dict | None:
    """The run of `setup` and `rule` without attackers on `partition`'s data."""
    return next((r for r in rows if not r["fraction"] and setup_of(r) == setup
                 and r["rule"] == rule and r.get("partition", "iid") == partition), None)


def draw(rows, curves, configs, path):
    """One heat map per (attack, fraction): rows algorithm/placement, columns rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels, lines, rules = panels_of(rows), lines_of(rows), rules_of(rows)
    honest = {(setup_of(r), r["rule"]): r["final_accuracy"] for r in rows
              if not r["fraction"] and iid(r)}
    width = max(3.2, 0.8 * len(rules) + 1) * max(len(panels), 1)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(max(width, 6.0), 3.4),
                             squeeze=False)
    for ax, (attack, fraction) in zip(axes[0], panels, strict=False):
        cells = []
        for a, p in lines:
            found = [_cell(rows, fraction, attack, a, p, rule) for rule in rules]
            cells.append([float("nan") if r is None else r["final_accuracy"] or 0.0
                          for r in found])
        ax.imshow(cells, vmin=0, vmax=1, cmap="RdYlGn")
        for i, line in enumerate(cells):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(rules)), [r.replace("_", "\n") for r in rules], fontsize=7)
        ax.set_yticks(range(len(lines)), [f"{a} {p}" for a, p in lines], fontsize=7)
        ax.set_title(f"{attack}, {100 * fraction:g} % attackers", fontsize=9)
    fig.suptitle("Honest peers' accuracy (%) after the run" + (
        f"; no attackers: up to {100 * max(honest.values()):.0f} %" if honest else ""),
        fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _accuracy(row, worst: bool = False) -> str:
    """The honest peers' final accuracy (`mean +- std` over replicas), with the worst honest
    peer's in brackets when `worst`."""
    if row is None:
        return ""
    text = _points(row, "final_accuracy")
    if worst and row.get("accuracy_min") not in ("", None):
        text += f" (worst {_points(row, 'accuracy_min')})"
    return text + (" (diverged)" if str(row["diverged"]) == "True" else "")


def _points(row, key) -> str:
    value, spread = row[key], row.get(f"{key}_std")
    text = f"{100 * float(value or 0.0):.2f}"
    if spread not in ("", None):
        text += f" ± {100 * float(spread):.2f}"
    return text + " %"


def table(rows, fraction: float, attack: str) -> str:
    """A Markdown table of honest final accuracy (the worst honest peer's in brackets):
    setup/placement x rule."""
    rules = rules_of(rows)
    out = ["| algorithm, placement | " + " | ".join(rules) + " |",
           "|---|" + "---|" * len(rules)]
    for a, p in lines_of(rows):
        cells = [_accuracy(_cell(rows, fraction, attack, a, p, rule), worst=True)
                 for rule in rules]
        out.append(f"| {a}, {p} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def honest_table(rows) -> str:
    """A Markdown table of the runs without attackers' final accuracy, the worst honest peer's
    in brackets: setup (and data, where some are not IID) x rule."""
    honest = [r for r in rows if not r["fraction"]]
    rules = rules_of(honest)
    partitions = ordered((r.get("partition", "iid") for r in honest), ("iid",))
    out = ["| algorithm | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for partition in partitions:
        for setup in ordered(setup_of(r) for r in honest):
            cells = [_accuracy(_honest(honest, setup, rule, partition), worst=True)
                     for rule in rules]
            if any(cells):
                label = setup if partitions == ["iid"] else f"{setup}, {partition}"
                out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def consensus_table(rows) -> str:
    """The consensus distance after the last iteration of the runs without attackers (mean
    squared distance of the honest peers' models to their mean): setup, data x rule."""
    honest = [r for r in rows if not r["fraction"]]
    rules = rules_of(honest)
    out = ["| algorithm, data | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for partition in ordered((r.get("partition", "iid") for r in honest), ("iid",)):
        for setup in ordered(setup_of(r) for r in honest):
            found = [_honest(honest, setup, rule, partition) for rule in rules]
            if any(found):
                out.append(f"| {setup}, {partition} | " + " | ".join(
                    "" if r is None or r["consensus_after"] in ("", None)
                    else f"{float(r['consensus_after']):.3g}" for r in found) + " |")
    return "\n".join(out)


def breakdown_points(rows, points: float = BREAKDOWN_POINTS) -> dict:
    """(setup, placement, attack, rule) -> (the largest fraction f that ran such that at every
    fraction up to f the honest accuracy stayed within `points` of the rule's accuracy without
    attackers (0.0: not even the smallest), whether every fraction that ran stayed within);
    only where the run without attackers is there."""
    found = {}
    for setup, placement in lines_of([r for r in rows if r["fraction"] and iid(r)]):
        for attack in ordered((r["attack"] for r in rows if r["fraction"]), ATTACKS):
            for rule in rules_of(rows):
                honest = _honest(rows, setup, rule)
                fractions = sorted({r["fraction"] for r in rows if r["fraction"] and iid(r)
                                    and (r["attack"], setup_of(r), r["placement"], r["rule"])
                                    == (attack, setup, placement, rule)})
                if honest is None or not fractions:
                    continue
                tolerated = 0.0
                for fraction in fractions:
                    row = _cell(rows, fraction, attack, setup, placement, rule)
                    if (str(row["diverged"]) == "True" or float(row["final_accuracy"] or 0.0)
                            < float(honest["final_accuracy"]) - points):
                        break
                    tolerated = fraction
                found[(setup, placement, attack, rule)] = (tolerated,
                                                           tolerated == fractions[-1])
    return found


def breakdown_table(rows) -> str:
    """The breakdown points (`breakdown_points`): setup, placement x attack, one column per
    rule."""
    points = breakdown_points(rows)
    if not points:
        return ""
    rules = [rule for rule in rules_of(rows) if any(k[3] == rule for k in points)]
    attacks = ordered((k[2] for k in points), ATTACKS)
    out = ["| algorithm, placement | attack | " + " | ".join(rules) + " |",
           "|---|---|" + "---|" * len(rules)]
    for setup, placement in lines_of([r for r in rows if r["fraction"] and iid(r)]):
        for attack in attacks:
            cells = []
            for rule in rules:
                point = points.get((setup, placement, attack, rule))
                cells.append("" if point is None else
                             f"{'≥ ' if point[1] else ''}{100 * point[0]:g} %")
            if any(cells):
                out.append(f"| {setup}, {placement} | {attack} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def tables(rows) -> str:
    """The report's tables: without attackers (accuracy with the worst honest peer, then the
    consensus distance), the breakdown points, then one per attack and fraction."""
    parts = []
    if any(not r["fraction"] for r in rows):
        parts += ["**No attackers** (honest accuracy; the worst honest peer's in brackets).",
                  honest_table(rows)]
        if any(r.get("consensus_after") not in ("", None) for r in rows if not r["fraction"]):
            parts += ["**Consensus distance without attackers** (after the last iteration).",
                      consensus_table(rows)]
    breakdown = breakdown_table(rows)
    if breakdown:
        parts += [f"**Breakdown points**: the largest attacker fraction run up to which the "
                  f"honest accuracy stays within {100 * BREAKDOWN_POINTS:g} points of the "
                  "same rule's without attackers (≥: every fraction run).", breakdown]
    for attack, fraction in panels_of(rows):
        parts += [f"**{100 * fraction:g} % {attack}.**", table(rows, fraction, attack)]
    return "\n\n".join(parts)


def _span(values) -> str:
    low, high = pct(min(values)), pct(max(values))
    return low if low == high else f"{low} to {high}"


def summarize(rows) -> str:
    """Per attack and fraction, each algorithm and placement's accuracy under the mean and
    under the other rules."""
    parts = []
    honest = [r["final_accuracy"] for r in rows if not r["fraction"] and iid(r)]
    if honest:
        parts.append(f"Without attackers: {_span(honest)} under every rule.")
    for attack, fraction in panels_of(rows):
        said = []
        for a, p in lines_of(rows):
            mine = [r for r in rows if iid(r) and (r["attack"], r["fraction"], setup_of(r),
                                                   r["placement"]) == (attack, fraction, a, p)]
            mean = [r["final_accuracy"] for r in mine if r["rule"] == "mean"]
            others = [r for r in mine if r["rule"] != "mean"]
            named = (others[0]["rule"] if len({r["rule"] for r in others}) == 1 else
                     "other rules" if mean else "rules")
            words = ([f"mean {pct(mean[0])}"] if mean else []) + (
                [f"{named} {_span([r['final_accuracy'] for r in others])}"] if others else [])
            if words:
                said.append(f"{a} {p} {', '.join(words)}")
        parts.append(f"{100 * fraction:g} % {attack}: {'; '.join(said)}.")
    diverged = sum(str(r["diverged"]) == "True" for r in rows)
    if diverged:
        parts.append(f"{diverged} run{'s' if diverged > 1 else ''} diverged.")
    return " ".join(parts)


def setting(scale, configs):
    options = STUDY.options_of(scale)
    largest = {}
    for config in configs:
        largest.setdefault(setup_name(config), assemble.algorithm(config).max_group_size)
    groups = ", ".join(f"{name} {m}" for name, m in largest.items())
    partitions = ordered(f"Dirichlet alpha {c.dirichlet_alpha:g}" for c in configs
                         if c.partition == "dirichlet")
    noniid = (f"; without attackers also on non-IID data ({', '.join(partitions)} per class)"
              if partitions else "")
    return (f"N = {scale.study_peers}, {', '.join(options.algorithms)} (largest group: "
            f"{groups}){noniid}; attackers: the fractions {set_of(options.fractions)} of the "
            "peers, drawn once from the seed, full participation; attacks "
            f"{', '.join(options.attacks)}; group rules {', '.join(options.rules)}, each "
            "tolerating f = max(1, ceil(p M)) copies, at most (M - 1) // 2 (M the largest "
            "group; the clipping rules tau 1, centered clipping 3 iterations; self-centred "
            "clipping not at FedAvg's server, which holds no copy of its own); placements "
            f"{', '.join(options.placements)} where groups come from keys (colluders announce "
            f"the keys that pack them into the same groups); {describe(configs[0])}. Accuracy "
            "is the honest peers' test accuracy after the last iteration; no target, every "
            "run takes all its iterations.")


STUDY = Study(
    name="byzantine",
    configs=configs,
    options=OPTIONS,
    make_row=make_row,
    fields=FIELDS,
    draw=draw,
    defaults=dict(mnist=dict(max_iterations=30, eval_peers="all")),
    section=8,
    title="Beyond the paper: Byzantine peers inside Moshpit groups",
    claim=("None: the MAR-FL paper assumes honest peers, and its group mean is not robust "
           "to a single peer that sends anything it likes. This experiment (ours) asks what "
           "a few attackers do to MAR-FL, and what robust group rules (applied by every "
           "member to the copies it receives, ByzFL's definitions) buy inside Moshpit's small "
           "groups compared with the same rules at FedAvg's server, which sees every upload "
           "at once, and with gossip's pairs."),
    setting=setting,
    tables=tables,
    summarize=summarize,
)
