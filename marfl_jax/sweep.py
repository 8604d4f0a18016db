"""One way to write a study: the `Study` spec, its `Option`s, and the runner that runs (or
reuses) its configs and writes its rows, CSV and figure.

A study is one module of `marfl_jax.experiments` holding `STUDY = Study(...)`: its name, its own
settings (`options`, with their defaults), its configs for a `Scale`, a row per finished run, the
CSV's fields, the figure, and (for the paper's reproduction report) the claim it checks, the
setting, the tables and the sentence on what was measured. `launch.compare --study=NAME` runs
one; `launch.reproduce` runs those with a `section`, in section order, and writes each one's
report section from its record. `runner.run` returns a run already finished in its workdir
instead of running it again, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from marfl_jax import data
from marfl_jax.config import Config

ROW_FIELDS = ("num_peers", "algorithm", "schedule", "group_size", "rounds", "dropout",
              "bytes_per_iteration", "iterations", "reached_target", "iterations_to_target",
              "bytes_to_target", "final_accuracy", "best_accuracy", "wall_seconds")
# The report's columns of result_row's results.
RESULT_COLUMNS = (("iterations_to_target", "iterations to target"),
                  ("bytes_per_iteration", "bytes / iteration"),
                  ("bytes_to_target", "bytes to target"), ("final_accuracy", "final accuracy"))


def result_row(config: Config, result) -> dict:
    """The row every study can use: N, the algorithm and its grid, bytes per iteration and to
    the target, iterations, accuracies, wall time."""

    from marfl_jax import assemble

    summary, metrics = result.summary, result.metrics
    reached = summary["iteration_reached_target"]
    algorithm = assemble.algorithm(config)
    keyed = algorithm.group_keys
    return {
        "num_peers": config.num_peers,
        "algorithm": config.algorithm,
        "schedule": config.schedule if keyed else "",
        "group_size": config.group_size if keyed else "",
        "rounds": algorithm.num_rounds,
        "dropout": config.dropout,
        "bytes_per_iteration": round(summary["cumulative_bytes"] / max(len(metrics), 1)),
        "iterations": summary["iterations"],
        "reached_target": summary["reached_target"],
        "iterations_to_target": "" if reached is None else reached + 1,
        "bytes_to_target": "" if reached is None else summary["bytes_to_target"],
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "wall_seconds": summary["wall_seconds"],
    }


# Row fields that hold a summary's figure (by its summary name): a replicated run's row adds
# each one's standard deviation over the replicas as `<field>_std`.
SPREAD_FIELDS = {"final_accuracy": "final_accuracy", "best_accuracy": "best_accuracy",
                 "iterations_to_target": "iteration_reached_target",
                 "bytes_to_target": "bytes_to_target",
                 "sim_seconds_to_target": "sim_seconds_to_target"}


def with_spread(row: dict, config: Config, summary: dict) -> dict:
    """`row` of a run with --replicas > 1 with `replicas`, `replicas_reached_target` and the
    `_std` of each of its `SPREAD_FIELDS` ('' where undefined); other rows as they are."""
    if config.replicas <= 1:
        return row
    row = {**row, "replicas": config.replicas,
           "replicas_reached_target": summary.get("replicas_reached_target", "")}
    for field, name in SPREAD_FIELDS.items():
        if field in row and f"{name}_std" in summary:
            spread = summary[f"{name}_std"]
            row[f"{field}_std"] = "" if spread is None else spread
    return row


def first_reaching(metrics: Sequence[dict], accuracy: float) -> dict | None:
    """The first evaluated row with accuracy >= `accuracy`, or None."""
    return next((r for r in metrics if r.get("accuracy", -1.0) >= accuracy), None)


@dataclasses.dataclass(frozen=True)
class Option:
    """One of a study's own settings: its default, the converter of each value given as text
    (`launch.compare --option=NAME=V1,V2`), and what it sets.

    A tuple default takes any number of values; any other default takes exactly one (None: the
    shared setting's value, which `help` names)."""

    default: Any
    kind: Callable[[str], Any] = str
    help: str = ""

    @property
    def many(self) -> bool:
        return isinstance(self.default, tuple)

    def parse(self, texts: Sequence[str]):
        """The value the texts give (each converted by `kind`); ValueError if they give none."""
        values = tuple(self.kind(text) for text in texts)
        if self.many:
            return values
        if len(values) != 1:
            raise ValueError(f"takes one value, not {len(values)}")
        return values[0]

    def normalize(self, value):
        """A value given in code as it is read: a tuple for a tuple option."""
        if self.many and not isinstance(value, tuple):
            return tuple(value) if isinstance(value, (list, set, frozenset)) else (value,)
        return value


@dataclasses.dataclass(frozen=True)
class Study:
    """A sweep: its own settings, its runs, its rows, its figure and (in the report) its words.

    Attributes:
      name: the `--study` / `--experiments` name, the CSV's stem (and its module's name).
      configs: (scale, workdir) -> one Config per run, each with its own workdir under workdir;
        the study's settings at that scale are `STUDY.options_of(scale)`.
      options: the study's own settings by name (`Option`: default, converter, help): what
        `launch.compare --option=NAME=V1,V2` and a scale's `options[name]` may set. The shared
        setting and the size (peer counts, algorithms, N) are the `Scale`'s.
      make_row: (config, RunResult) -> a dict, one per run.
      fields: the CSV's columns (keys of the rows).
      draw: (rows, curves, configs, path) -> None, the figure; curves maps a run's workdir
        name to its metrics.
      figure: the figure's file name in launch.compare's workdir (default `<name>.png`; the
        reproduction's figures are always `<name>.png`).
      defaults: launch.compare's defaults where they differ from `SCALES["small"]`: Scale
        fields (the size), and "mnist": Config fields.
      section: its place in the paper reproduction's report (None: launch.compare only).
      title, claim: the report's heading and the (paper's) claim it checks.
      setting: (scale, configs) -> what was run, one paragraph.
      columns: (row key, column heading) pairs of the report's table.
      tables: rows -> the Markdown of the report's tables (None: one table of `columns`).
      summarize: rows -> the sentence on what was measured.
      derive: rows -> None, adds columns that compare runs (None: nothing to add).
      data_flag: the launch.reproduce flag that supplies the study's data, named in the reason
        of a run left out for missing data.
    """

    name: str
    configs: Callable[..., list[Config]]
    options: Mapping[str, Option] = dataclasses.field(default_factory=dict)
    make_row: Callable = result_row
    fields: tuple[str, ...] = ROW_FIELDS
    draw: Callable | None = None
    figure: str = ""
    defaults: dict = dataclasses.field(default_factory=dict)
    section: int | None = None
    title: str = ""
    claim: str = ""
    setting: Callable | None = None
    columns: tuple[tuple[str, str], ...] = ()
    tables: Callable[[list[dict]], str] | None = None
    summarize: Callable[[list[dict]], str] | None = None
    derive: Callable[[list[dict]], None] | None = None
    data_flag: str = "--data_dir"

    @property
    def figure_name(self) -> str:
        return self.figure or f"{self.name}.png"

    def check_option_names(self, names, given_by: str = "--option") -> None:
        """ValueError naming `given_by`, this study and its options if a name is not one."""
        unknown = [name for name in names if name not in self.options]
        if unknown:
            allowed = ", ".join(self.options) if self.options else "none"
            raise ValueError(f"{given_by}: the study {self.name} has no option "
                             f"{', '.join(unknown)}; its options: {allowed}")

    def parse_options(self, given: Sequence[tuple[str, Sequence[str]]]) -> dict:
        """{name: value} of (name, values as text) pairs (`--option=NAME=V1,V2`), each checked
        and converted; ValueError naming --option for a name or value it cannot take."""
        self.check_option_names([name for name, _ in given])
        values = {}
        for name, texts in given:
            try:
                values[name] = self.options[name].parse(texts)
            except ValueError as error:
                raise ValueError(f"--option={name}={','.join(texts)}: {error} (the study "
                                 f"{self.name}: {self.options[name].help})") from None
        return values

    def options_of(self, scale) -> types.SimpleNamespace:
        """The study's settings at `scale`: its defaults, with `scale.options[name]` on top."""
        given = scale.options.get(self.name, {})
        self.check_option_names(given, f"scale {scale.name}")
        return types.SimpleNamespace(**{
            name: option.normalize(given[name]) if name in given else option.default
            for name, option in self.options.items()})


@dataclasses.dataclass
class Outcome:
    """What running a study gave: its configs, rows, the figure's path, seconds of all its runs,
    and the runs left out as (what, why) pairs (missing data)."""

    study: Study
    configs: list[Config]
    rows: list[dict]
    figure: str | None
    run_seconds: float
    not_run: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def run_configs(configs: Sequence[Config], on_row=None, make_row=result_row,
                on_result=None) -> list[dict]:
    """Runs (or reuses) every config; `make_row(config, result)` makes its row, and
    on_row(row) / on_result(config, result) are called as each finishes."""
    rows = []
    for config in configs:
        result = _run_once(config)
        rows.append(with_spread(make_row(config, result), config, result.summary))
        if on_result is not None:
            on_result(config, result)
        if on_row is not None:
            on_row(rows[-1])
    return rows


def _run_once(config: Config):
    """runner.run, or what a run that diverged left (its summary says `diverged`): a sweep
    records a diverged run as a row instead of stopping, and does not run it again."""
    from marfl_jax import runner, watch
    from marfl_jax import workdir as files

    summary = files.read_json(os.path.join(config.workdir, "summary.json"))
    if summary is not None and "diverged" in summary:
        files.previous_config(config, config.workdir)  # Refuses a different run's workdir.
    else:
        try:
            return runner.run(config)
        except watch.DivergenceError:
            summary = files.read_json(os.path.join(config.workdir, "summary.json"))
    metrics = files.read_rows(os.path.join(config.workdir, "metrics.jsonl"),
                              summary["iterations"])
    return runner.RunResult(summary, metrics)


def data_missing(config: Config) -> str | None:
    """Why `config`'s dataset cannot be loaded here (the loader's message), or None. Probed once
    per dataset setting in a process, however many studies use it."""
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


def _runnable(study: Study, configs: Sequence[Config]) -> tuple[list[Config], list]:
    """The configs whose data is present, and (run, why) for the others."""
    missing = {}
    for config in configs:
        key = (config.dataset, config.data_dir)
        if key not in missing:
            missing[key] = data_missing(config)
    runnable, not_run = [], []
    for config in configs:
        reason = missing[(config.dataset, config.data_dir)]
        if reason is None:
            runnable.append(config)
        else:
            if study.data_flag != "--data_dir":
                reason += f"\n(launch.reproduce: give the data with {study.data_flag}.)"
            not_run.append((os.path.basename(config.workdir), reason))
    return runnable, not_run


def run(study: Study, configs: Sequence[Config], figure: str, on_row=None,
        check_data: bool = True) -> Outcome:
    """Runs (or reuses) the study's configs and draws its figure to the path `figure`. With
    `check_data`, runs whose data is missing are left out (`Outcome.not_run`)."""
    runnable, not_run = _runnable(study, configs) if check_data else (list(configs), [])
    curves = {}
    rows = run_configs(
        runnable, on_row=on_row, make_row=study.make_row,
        on_result=lambda c, r: curves.update({os.path.basename(c.workdir): r.metrics}))
    drawn = None
    if rows:
        if study.derive is not None:
            study.derive(rows)
        if study.draw is not None:
            os.makedirs(os.path.dirname(figure) or ".", exist_ok=True)
            study.draw(rows, curves, list(configs), figure)
            drawn = figure
    return Outcome(study, list(configs), rows, drawn,
                   sum(r["wall_seconds"] for r in rows), not_run)


def write_csv(rows: Sequence[dict], path: str, fields: Sequence[str] = ROW_FIELDS) -> None:
    """The rows' `fields`, each followed by its `_std` where a row has one (replicas), then the
    replica counts."""
    present = {key for row in rows for key in row}
    fields = [name for field in fields
              for name in (field, f"{field}_std") if name == field or name in present]
    fields += [name for name in ("replicas", "replicas_reached_target") if name in present]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
