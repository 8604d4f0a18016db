"""What crosses the wire: MAR-FL (or each of several algorithms) at N=64 for each message codec,
with momentum in the messages and without; bytes and iterations to the target, accuracy
against cumulative bytes (section 7 of the reproduction; the lossy codecs are ours).

    python -m launch.compare --study=codec       # N=64 CNN: each codec, with / without momentum
    python -m launch.compare --study=codec --algorithms=marfl,fedavg,arfl,rdfl,gossip --model=mlp
    python -m launch.reproduce --experiments=codec

Settings (`--option=NAME=V1,V2`, `STUDY.options`): `codecs` (default float32, float16, bfloat16,
int8, of `marfl_jax.codec.CODECS`; alias `--codecs`), `algorithms` (marfl; `--algorithms`); N is
`--churn_peers` (64). Writes `codec.csv` and `codec.png` (accuracy against cumulative bytes for
one algorithm; bytes to the target per algorithm for several).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from marfl_jax import plotting
from marfl_jax.config import Config
from marfl_jax.report import describe, pct
from marfl_jax.scales import mnist_config
from marfl_jax.sweep import Option, Study, first_reaching

FIELDS = ("run", "algorithm", "codec", "share_momentum", "payloads_per_message",
          "bytes_per_iteration", "iterations", "iterations_to_target", "bytes_to_target",
          "final_accuracy", "best_accuracy", "wall_seconds")
REFERENCE = ("float32", True)  # The authors' messages: float32 weights and momentum.


def codec_configs(base: Config, codecs: Sequence[str], algorithm_names: Sequence[str] = ("marfl",),
                  share_momentum: Sequence[bool] = (True, False)) -> list[Config]:
    """Every algorithm with every codec, with and without momentum in the messages. Workdirs
    `{codec}_{momentum|weights}`, prefixed `{algorithm}_` when there are several algorithms."""
    def name(algorithm, codec, share):
        run = f"{codec}_{'momentum' if share else 'weights'}"
        return run if len(algorithm_names) == 1 else f"{algorithm}_{run}"

    return [dataclasses.replace(
        base, algorithm=algorithm, codec=codec, share_momentum=share,
        workdir=os.path.join(base.workdir, name(algorithm, codec, share))).validate()
        for algorithm in algorithm_names for share in share_momentum for codec in codecs]


OPTIONS = {
    "codecs": Option(("float32", "float16", "bfloat16", "int8"), str,
                     "the message codecs (marfl_jax.codec.CODECS)"),
    "algorithms": Option(("marfl",), str, "the algorithms"),
}


def configs(scale, workdir):
    options = STUDY.options_of(scale)
    return codec_configs(mnist_config(scale, scale.study_peers, workdir), options.codecs,
                         options.algorithms)


def codec_row(config: Config, result) -> dict:
    summary, metrics = result.summary, result.metrics
    target = first_reaching(metrics, config.target_accuracy)
    return {
        "run": os.path.basename(config.workdir),
        "algorithm": config.algorithm,
        "codec": config.codec,
        "share_momentum": config.share_momentum,
        "payloads_per_message": 2 if config.share_momentum else 1,
        "bytes_per_iteration": round(summary["cumulative_bytes"] / max(len(metrics), 1)),
        "iterations": summary["iterations"],
        "iterations_to_target": "" if target is None else target["iteration"] + 1,
        "bytes_to_target": "" if target is None else target["cumulative_bytes"],
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "wall_seconds": summary["wall_seconds"],
    }


def draw(rows, curves, configs, path):
    if len({row["algorithm"] for row in rows}) > 1:
        plotting.plot_codec_bytes(rows, path)
    else:
        plotting.plot_accuracy_vs_bytes(curves, path, (0.5, configs[0].target_accuracy))


def setting(scale, configs):
    return (f"MAR-FL, N = {scale.study_peers}; messages with weights and momentum (the "
            "authors') and with weights only (`--share_momentum=false`, each peer keeps "
            "its own momentum), each through the codecs "
            f"{', '.join(STUDY.options_of(scale).codecs)} "
            "(`--codec`; int8 = blockwise absmax, one float32 scale per 4096 values); "
            f"{describe(configs[0])}. Each member averages its own exact copy with its mates' "
            "decoded ones; bytes are the encoded sizes.")


def _versus(codec, both, weights) -> str:
    """Weights only against momentum for one codec."""
    if weights["iterations_to_target"] == "":
        return (f"{codec}: weights only missed the target "
                f"({pct(weights['final_accuracy'])} after {weights['iterations']} "
                "iterations)" + ("." if both["iterations_to_target"] == "" else
                                 f"; with momentum it took "
                                 f"{both['iterations_to_target']} iterations."))
    if both["iterations_to_target"] == "":
        return (f"{codec}: weights only reached the target in "
                f"{weights['iterations_to_target']} iterations; with momentum it was "
                "missed.")
    return (f"{codec}: weights only reached the target in "
            f"{weights['iterations_to_target']} iterations against "
            f"{both['iterations_to_target']} with momentum, with "
            f"{weights['bytes_to_target'] / both['bytes_to_target']:.2f}x the "
            "bytes.")


def summarize(rows, reference=REFERENCE) -> str:
    """Weights only against momentum per codec, and each run's bytes to the target against the
    reference's (the authors': float32 with momentum)."""
    by_run = {(r["codec"], r["share_momentum"]): r for r in rows}
    parts = []
    for codec in dict.fromkeys(r["codec"] for r in rows):
        both, weights = by_run.get((codec, True)), by_run.get((codec, False))
        if both is not None and weights is not None:
            parts.append(_versus(codec, both, weights))
    authors = by_run.get(reference)
    if authors and authors["bytes_to_target"] != "":
        cheapest = min((r for r in rows if r["bytes_to_target"] != ""),
                       key=lambda r: r["bytes_to_target"])
        parts.append(f"The fewest bytes to the target: {cheapest['run']}, "
                     f"{cheapest['bytes_to_target'] / authors['bytes_to_target']:.2f}x the "
                     "authors' float32 messages with momentum.")
    return " ".join(parts)


STUDY = Study(
    name="codec",
    configs=configs,
    options=OPTIONS,
    make_row=codec_row,
    fields=FIELDS,
    draw=draw,
    defaults=dict(mnist=dict(model="cnn", target_accuracy=0.95, local_batches=4, eval_every=1,
                             max_iterations=60)),
    section=7,
    title="What crosses the wire: momentum and message codecs",
    claim=("Transferring the momentum alongside the weights doubles the payload but is "
           "necessary for convergence stability. (The paper's design argument for MAR-FL's "
           "messages; the lossy codecs are ours, after the float16 and 8-bit codecs that "
           "hivemind offers for Moshpit averaging.)"),
    setting=setting,
    columns=(("run", "run"), ("payloads_per_message", "payloads / message"),
             ("bytes_per_iteration", "bytes / iteration"),
             ("iterations_to_target", "iterations to target"),
             ("bytes_to_target", "bytes to target"), ("final_accuracy", "final accuracy")),
    summarize=summarize)
