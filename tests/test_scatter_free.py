"""The compiled iteration has no float scatter (issue 29): XLA's deterministic GPU ops
(`--deterministic`, the default) rewrite a float scatter-add into a serial loop over its
indices, and without them its additions run in an unspecified order. Integer scatters (ranks,
counts) are exact in any order and stay."""

import re

import jax
import numpy as np
import pytest

from marfl_jax import Config, assemble
from marfl_jax import data as data_lib
from marfl_jax import plan as plan_lib
from marfl_jax.core import make_iteration
from tests.simulate import synthetic_data

_MLP = dict(model="mlp", num_peers=16, group_size=4, key_dim=2, local_batches=1, batch_size=4)
CONFIGS = {
    # The main job's shape (paper CNN on a perfect grid), smaller.
    "main_job": dict(num_peers=8, group_size=2, key_dim=3, local_batches=1, batch_size=4),
    "dropout": dict(_MLP, dropout=0.2),
    "gossip": dict(_MLP, algorithm="gossip"),
    "off_grid": dict(_MLP, num_peers=12),
    "dp": dict(_MLP, dp=True),
    "mkd": dict(_MLP, mkd=True, mkd_batches=1),
    "robust_rule": dict(_MLP, aggregator="trimmed_mean", aggregator_f=1),
    "clock": dict(_MLP, network="lognormal", round_timeout_s=30.0, dropout=0.2, wire="butterfly"),
    "rdfl": dict(_MLP, algorithm="rdfl", dropout=0.2, network="uniform"),
    "fedavg": dict(_MLP, algorithm="fedavg", dropout=0.2, network="uniform"),
}
# An HLO instruction line: "name = TYPE[dims]{layout} scatter(...)" (or a tuple of such).
_SCATTER = re.compile(r"=\s*\(?\s*([a-z]+\d*)\[[^=]*?\bscatter\(")
_FLOATING = ("f16", "bf16", "f32", "f64", "f8")


def float_scatters(hlo_text: str) -> list[str]:
    """The HLO lines of scatters whose element type is floating."""
    lines = []
    for line in hlo_text.splitlines():
        match = _SCATTER.search(line)
        if match and match.group(1).startswith(_FLOATING):
            lines.append(line.strip())
    return lines


def iteration_hlo(config: Config) -> str:
    data = synthetic_data(config, examples_per_peer=8)
    sample = data_lib.preprocess(data.x_train[:1])
    model = assemble.build_model(config, 10, plan_lib.fixed(config))
    sim = assemble.pieces(config, model, sample).sim
    state = assemble.initial_state(config, model, sim, sample)
    distilling = sim.distillation is not None
    weight = (np.float32(0.5),) if distilling else ()
    lowered = jax.jit(make_iteration(sim, distilling)).lower(state, jax.random.key(1), data,
                                                              *weight)
    return lowered.as_text(dialect="hlo")


def test_the_detector_finds_a_float_scatter_add():
    hlo = jax.jit(lambda x, i: x.at[i].add(1.0)).lower(
        np.zeros(4, np.float32), np.array([1, 1])).as_text(dialect="hlo")
    assert float_scatters(hlo)
    hlo = jax.jit(lambda x, i: x.at[i].add(1)).lower(
        np.zeros(4, np.int32), np.array([1, 1])).as_text(dialect="hlo")
    assert not float_scatters(hlo)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_iteration_has_no_float_scatter(name):
    config = Config(**CONFIGS[name])
    config.validate()
    assert float_scatters(iteration_hlo(config)) == []


@pytest.mark.slow
def test_an_attacked_round_has_no_float_scatter():
    config = Config(**_MLP, aggregator="median", byzantine_fraction=0.2, attack="sign_flip")
    assert float_scatters(iteration_hlo(config)) == []
