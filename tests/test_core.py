"""The stage chain: which stages a config composes, the contract, and a user-built chain."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marfl_jax import Config, assemble, core, mixing, models
from marfl_jax.core import Context, Step, build_chain, make_iteration, run_chain, step_keys

TINY = Config(model="mlp", num_peers=4, group_size=2, key_dim=2, local_batches=1, batch_size=4)


def _names(chain):
    return [stage.update.__qualname__.split(".")[0] for stage in chain]


def _simulation(config: Config):
    model = models.get_model(config.model, 10)
    return assemble.simulation(config, model), model


def test_the_chain_states_how_dp_and_mkd_compose():
    plain, _ = _simulation(TINY)
    assert _names(build_chain(plain)) == ["participation", "local_update", "aggregate", "observe"]
    both, _ = _simulation(Config(model="mlp", num_peers=64, dp=True, mkd=True))
    assert _names(build_chain(both)) == [
        "participation", "local_update", "privatize", "private_aggregate", "observe"]
    assert _names(build_chain(both, distilling=True)) == [
        "participation", "local_update", "privatize", "noised_model_teaches", "distill",
        "distilled_update", "private_aggregate", "observe"]
    mkd_only, _ = _simulation(Config(model="mlp", num_peers=16, key_dim=2, mkd=True))
    assert _names(build_chain(mkd_only, distilling=True)) == [
        "participation", "local_update", "distill", "aggregate", "observe"]


def test_stages_own_their_state_under_one_name():
    private, _ = _simulation(Config(model="mlp", num_peers=64, dp=True, mkd=True))
    owners = [s for s in build_chain(private, distilling=True) if s.init is not None]
    assert [s.update.__qualname__.split(".")[0] for s in owners] == ["privatize"]
    params = {"w": jnp.ones((3, 2))}
    peers = core.FLState(params, (), jnp.ones(3, bool), {})
    states = core.initial_stage_states(private, peers)
    assert set(states) == {"privacy"}
    chex.assert_trees_all_equal(states["privacy"].reference, params)
    assert core.initial_stage_states(_simulation(TINY)[0], peers) == {}
    twice = [owners[0], owners[0]]
    with pytest.raises(ValueError, match="two stages initialise the state 'privacy'"):
        core.init_stages(twice, peers)
    remembering, _ = _simulation(dataclasses.replace(TINY, aggregator="centered_clip_previous",
                                                     clip_tau=1.0))
    states = core.initial_stage_states(remembering, peers._replace(opt_state={"m": params["w"]}))
    assert set(states) == {"aggregator"}
    chex.assert_trees_all_equal(states["aggregator"], (params, {"m": params["w"]}))


def test_step_keys_are_distinct_and_a_function_of_the_key():
    keys = step_keys(jax.random.key(3), 5)
    again = step_keys(jax.random.key(3), 5)
    data = [np.asarray(jax.random.key_data(k)).reshape(-1, 2) for k in keys]
    for a, b in zip(data, (np.asarray(jax.random.key_data(k)).reshape(-1, 2) for k in again),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    flat = np.concatenate(data)
    assert len({tuple(row) for row in flat}) == len(flat)  # No two purposes share a key.


def _tiny_inputs():
    sim, model = _simulation(TINY)
    rng = np.random.default_rng(0)
    data = core.DeviceData(jnp.asarray(rng.integers(0, 255, (40, 28, 28)), jnp.uint8),
                           jnp.asarray(rng.integers(0, 10, 40), jnp.int32),
                           jnp.arange(40, dtype=jnp.int32).reshape(4, 10),
                           jnp.full((4,), 10, jnp.int32))
    state = core.init_state(model, sim.optimizer, jnp.zeros((1, 28, 28, 1)), 4,
                            jax.random.key(0), sim.churn_model)
    return sim, data, state


def test_a_user_stage_joins_the_chain():
    """A stage added to the chain sees the carry and adds info; the rest is unchanged."""
    sim, data, state = _tiny_inputs()

    def momentum_norm(step: Step, context: Context):
        norms = jax.tree.map(lambda x: jnp.sum(x.astype(jnp.float32) ** 2),
                             step.peers.opt_state)
        return step, {"momentum_sq": sum(jax.tree.leaves(norms))}

    chain = build_chain(sim)
    extended = chain[:-1] + [momentum_norm] + chain[-1:]
    context = Context(data, step_keys(jax.random.key(1), 4))
    base, info = jax.jit(lambda s: run_chain(chain, Step(s), context))(state)
    more, more_info = jax.jit(lambda s: run_chain(extended, Step(s), context))(state)
    chex.assert_trees_all_equal(base.peers, more.peers)
    assert float(more_info["momentum_sq"]) > 0
    assert set(more_info) == set(info) | {"momentum_sq"}


def test_iteration_is_the_chain_under_jit():
    sim, data, state = _tiny_inputs()
    key = jax.random.key(2)
    new, info = jax.jit(make_iteration(sim))(state, key, data)
    step, _ = jax.jit(lambda s: run_chain(build_chain(sim), Step(s),
                                          Context(data, step_keys(key, 4))))(state)
    chex.assert_trees_all_close(new, step.peers, rtol=1e-5, atol=1e-8)
    # Full participation on a 2x2 grid: everyone ends at the exact mean, so exactly 0.
    assert float(info["consensus_after"]) == 0.0 < float(info["consensus_before"])
    # The stage reports that 0 without measuring it: it holds because the copies are equal.
    for leaf in jax.tree.leaves(new.params):
        chex.assert_trees_all_equal(leaf, jnp.broadcast_to(leaf[:1], leaf.shape))
    assert float(mixing.consensus_distance(new.params, jnp.ones(4, bool))) == 0.0
    assert info["member_sizes"].shape == (2, 4)
    assert assemble.algorithm(TINY).exact


def _forget_peer(peer):
    """A stage that makes `peer` absent after participation decided everyone takes part: a
    source of absence `everyone_takes_part` does not know of."""

    def forgotten_absence(step: Step, context: Context):
        absent = jnp.arange(step.schedule.shape[1]) == peer
        return step._replace(schedule=jnp.where(absent, -1, step.schedule),
                             present=step.present & ~absent), {}

    return forgotten_absence


def test_a_forgotten_absence_is_never_averaged_over_the_grid():
    sim, data, state = _tiny_inputs()
    assert sim.algorithm.grid is not None  # 2 x 2 grid, full participation: the grid is passed.
    no_grid = sim._replace(algorithm=sim.algorithm._replace(grid=None))
    context = Context(data, step_keys(jax.random.key(4), 4))

    def run(simulation):
        chain = build_chain(simulation)
        chain.insert(1, _forget_peer(1))
        return jax.jit(lambda s: run_chain(chain, Step(s), context))(state)

    (checked, info), (segment, segment_info) = run(sim), run(no_grid)
    chex.assert_trees_all_close(checked.peers, segment.peers, rtol=1e-6, atol=1e-7)
    # Peer 1 kept its own model; the others did not get the grid's mean of all four.
    for leaf in jax.tree.leaves(checked.peers.params):
        assert not np.allclose(leaf[1], leaf[0])
    assert float(info["consensus_after"]) == float(segment_info["consensus_after"]) > 0


def test_a_non_mean_rule_runs_the_chain_without_the_grid():
    config = dataclasses.replace(TINY, aggregator="median").validate()
    sim, model = _simulation(config)
    _, data, state = _tiny_inputs()
    new, info = jax.jit(make_iteration(sim))(state, jax.random.key(2), data)
    mean_new, _ = jax.jit(make_iteration(_tiny_inputs()[0]))(state, jax.random.key(2), data)
    # Groups of two: the median is the mean (to rounding), and the 2 x 2 grid agrees exactly.
    chex.assert_trees_all_close(new.params, mean_new.params, rtol=1e-5, atol=1e-6)
    assert float(info["consensus_after"]) < 1e-10
