"""Peer profiles of the simulated clock: every peer's links and training speed (`--network`).

* `none`: no clock (rows as without it).
* `uniform`: every peer has `--uplink_mbps`, `--downlink_mbps`, `--latency_ms` and
  `--examples_per_s`.
* `lognormal`: per peer, each rate drawn log-normally with the flag as its median:
  rate = flag * exp(sigma * z), z ~ N(0, 1) per peer and rate, sigma = `--bandwidth_sigma` for
  the links and `--compute_sigma` for the speed (latency stays the flag's). Drawn from the
  seed alone, so a run and its resumption see the same peers.
* `trace`: a CSV (`--network_trace=PATH`), one row per peer (the first N rows are used), columns
  uplink_mbps, downlink_mbps, latency_ms and either examples_per_s or gflops (the training
  speed in GFLOP/s, turned into examples/s with the model's training FLOPs per example).

The defaults are assumptions, stated with their sources in docs/running.md ("Simulated time").
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from marfl_jax.clock import MBIT, Links
from marfl_jax.registry import ConfigError

NETWORKS = ("none", "uniform", "lognormal", "trace")
TRACE_COLUMNS = ("uplink_mbps", "downlink_mbps", "latency_ms")
SPEED_COLUMNS = ("examples_per_s", "gflops")


def _links(uplink_mbps, downlink_mbps, latency_ms, examples_per_s) -> Links:
    return Links(*(np.asarray(x, np.float32) for x in (
        np.asarray(uplink_mbps, np.float64) * MBIT, np.asarray(downlink_mbps, np.float64) * MBIT,
        np.asarray(latency_ms, np.float64) / 1e3, examples_per_s)))


def load_trace(path: str, num_peers: int) -> dict[str, np.ndarray]:
    """The first `num_peers` rows of a trace CSV, column by column (uplink_mbps, downlink_mbps,
    latency_ms and examples_per_s or gflops, each (N,) float64); ConfigError naming
    --network_trace when the file, a column or a value is wrong."""
    flag = f"--network_trace={path!r}"
    if not os.path.isfile(path):
        raise ConfigError(f"{flag}: no such file (a CSV with columns "
                          f"{', '.join(TRACE_COLUMNS)} and examples_per_s or gflops)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [name.strip() for name in reader.fieldnames or []]
        rows = [{k.strip(): v for k, v in row.items()} for row in reader]
    missing = [c for c in TRACE_COLUMNS if c not in header]
    speed = next((c for c in SPEED_COLUMNS if c in header), None)
    if missing or speed is None:
        missing += [] if speed else ["examples_per_s or gflops"]
        raise ConfigError(f"{flag} lacks the columns {missing}; it has {header}")
    if len(rows) < num_peers:
        raise ConfigError(f"{flag} has {len(rows)} rows; --num_peers={num_peers} needs one row "
                          "per peer")
    columns = {}
    for name in TRACE_COLUMNS + (speed,):
        try:
            values = np.array([float(row[name]) for row in rows[:num_peers]])
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{flag}: column {name} must hold numbers ({error})") from None
        low_ok = values >= 0 if name == "latency_ms" else values > 0
        if not np.all(np.isfinite(values) & low_ok):
            bad = int(np.flatnonzero(~(np.isfinite(values) & low_ok))[0])
            raise ConfigError(f"{flag}: column {name}, row {bad + 1} is {values[bad]!r}; it "
                              f"must be a number {'>= 0' if name == 'latency_ms' else '> 0'}")
        columns[name] = values
    return columns


def read_trace(path: str, num_peers: int, flops_per_example: Callable[[], float | None]) -> Links:
    """A trace's links; a gflops column becomes examples/s with the model's training FLOPs per
    example (`flops_per_example()`)."""
    flag = f"--network_trace={path!r}"
    columns = load_trace(path, num_peers)
    if "gflops" in columns:
        train_flops_per_example = flops_per_example()
        if not train_flops_per_example:
            raise ConfigError(f"{flag}: a gflops column needs the model's training FLOPs per "
                              "example, which XLA did not report here; give examples_per_s")
        columns["examples_per_s"] = columns.pop("gflops") * 1e9 / train_flops_per_example
    return _links(columns["uplink_mbps"], columns["downlink_mbps"], columns["latency_ms"],
                  columns["examples_per_s"])


class Settings(NamedTuple):
    """What the peer profiles read (`config.settings(network.Settings)`): the flags above."""

    num_peers: int
    network: str
    network_trace: str
    uplink_mbps: float
    downlink_mbps: float
    latency_ms: float
    examples_per_s: float
    bandwidth_sigma: float
    compute_sigma: float
    seed: int


def make_links(config: Settings, flops_per_example: Callable[[], float | None] = lambda: None
               ) -> Links | None:
    """The run's peer links (host numpy arrays), or None for --network=none.
    config: the `Settings` (a Config has every field too).
    flops_per_example: () -> one training example's FLOPs, for a trace's gflops column."""
    n = config.num_peers
    if config.network == "none":
        return None
    if config.network == "trace":
        return read_trace(config.network_trace, n, flops_per_example)
    flags = (config.uplink_mbps, config.downlink_mbps, config.examples_per_s)
    if config.network == "uniform":
        up, down, speed = (np.full(n, value) for value in flags)
    else:
        rng = np.random.default_rng([config.seed, 0x6E6574])  # "net": apart from other draws.
        z = rng.standard_normal((3, n))
        sigmas = np.array([config.bandwidth_sigma, config.bandwidth_sigma,
                           config.compute_sigma])[:, None]
        up, down, speed = np.asarray(flags)[:, None] * np.exp(sigmas * z)
    return _links(up, down, np.full(n, config.latency_ms), speed)
