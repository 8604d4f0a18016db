"""The Markdown of sweeps: numbers as the report shows them, a run's setting in one line, tables,
and the paper reproduction's report (REPRODUCTION.md) from the outcomes of its studies: every
section from its study's record (title, claim, setting, summary, tables, figures), nothing
written by hand."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

from marfl_jax.config import Config


def describe(config: Config) -> str:
    """The setting of a run in one line of flags that matter."""
    return (f"`--dataset={config.dataset} --model={config.model} --batch_size="
            f"{config.batch_size} --local_batches={config.local_batches} "
            f"--target_accuracy={config.target_accuracy:g} --max_iterations="
            f"{config.max_iterations} --eval_every={config.eval_every}`")


def set_of(values: Sequence[float]) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def pct(value) -> str:
    return "-" if value in ("", None) else f"{100 * value:.2f} %"


def gb(value) -> str:
    return "-" if value in ("", None) else f"{value / 1e9:,.2f} GB"


def num(value) -> str:
    if value in ("", None):
        return "-"
    return "inf" if value == math.inf else f"{value:,.4g}"


def _cell(key: str, value) -> str:
    if value in ("", None):
        return "-"
    if key in ("bytes_per_iteration", "bytes_to_target", "bytes_to_50", "mkd_bytes",
               "cumulative_bytes"):
        return gb(value)
    if "accuracy" in key:
        return pct(value)
    if key == "bytes_vs_marfl":
        return f"{value:.2f}x"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return num(value)
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(heading for _, heading in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, key) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def cell(row: dict, key: str) -> str:
    """row[key] as the report shows it: `mean +- std` where the row has the replicas' spread
    `key_std` (a run with --replicas > 1), else the value."""
    shown = _cell(key, row.get(key, ""))
    spread = row.get(f"{key}_std")
    if spread in ("", None) or shown == "-":
        return shown
    if "accuracy" in key:  # Points, not a share of a share.
        return f"{shown[:-2]} ± {100 * spread:.2f} %"
    return f"{shown} ± {_cell(key, spread)}"


def write_report(outcomes: Sequence, path: str, *, scale, command: str,
                 machine: str, wall_seconds: float) -> None:
    """Writes the Markdown report of `outcomes` (`sweep.Outcome`s of studies run at `scale`)
    to `path` (figures linked relative to it)."""
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
        f"times are listed per experiment). {_seeds(scale)} Every figure below was measured "
        "by that command. The paper's claims are paraphrased from its abstract and its "
        "description of the algorithms; its own tables were not reachable from this offline "
        "machine, so no number of the paper's is copied here beside ours. Bytes are what "
        "would cross the network, counted as the authors count them (each peer receives "
        "|g|-1 messages of weights and momentum per round).",
        "",
    ]
    not_run = [run for o in outcomes for run in o.not_run]
    for number, outcome in enumerate(outcomes, 1):
        study = outcome.study
        lines += [f"## {number}. {study.title}", "",
                  f"**The paper's claim.** {study.claim}", "",
                  f"**Setting.** {study.setting(scale, outcome.configs)}", ""]
        if outcome.rows:
            runs = f"{len(outcome.rows)} run{'s' if len(outcome.rows) > 1 else ''}"
            lines += [f"**Measured** ({runs}, "
                      f"{_duration(outcome.run_seconds)} of run time). "
                      f"{study.summarize(outcome.rows)}", "",
                      (study.tables(outcome.rows) if study.tables is not None
                       else markdown_table(outcome.rows, study.columns)), ""]
        else:
            lines += ["**Measured.** Nothing: no run of this experiment could start here.", ""]
        if outcome.figure:
            stem = os.path.splitext(os.path.basename(outcome.figure))[0]
            figures = [outcome.figure] + sorted(
                os.path.join(os.path.dirname(outcome.figure), f)
                for f in os.listdir(os.path.dirname(outcome.figure))
                if f.startswith(f"{stem}_") and f.endswith(".png"))
            lines += [f"![{study.title}]({os.path.relpath(f, here)})" for f in figures]
            lines.append("")
        for whats, why in _by_reason(outcome.not_run):
            lines += [f"**Not run:** {whats}, because:", "", _quoted(why), ""]
    lines += ["## Not run", ""]
    lines += ([f"- {o.study.title}: {whats}" for o in outcomes
               for whats, _ in _by_reason(o.not_run)] if not_run else
              ["Every run of this scale ran."])
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _seeds(scale) -> str:
    replicas = scale.mnist.replicas
    if replicas <= 1:
        return "One seed per run."
    return (f"Every run is {replicas} replicas (seeds {scale.mnist.seed} .. "
            f"{scale.mnist.seed + replicas - 1}, `--replicas={replicas}`): a figure x ± s is the "
            "replicas' mean and sample standard deviation.")


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
