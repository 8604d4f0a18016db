"""Tests of DP with adaptive clipping: clipping, noise level, the threshold's walk to its
quantile, the accountants against dp-accounting, exact reduction to MAR-FL, and runs."""

import dataclasses
import math

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp

from marfl_jax import accounting, assemble, comm, dp, runner
from marfl_jax.config import Config, ConfigError


def _tree(rng, num_peers, scale=1.0):
    return {"a": jnp.asarray(rng.normal(size=(num_peers, 30, 4)) * scale, jnp.float32),
            "b": {"c": jnp.asarray(rng.normal(size=(num_peers, 7)) * scale, jnp.float32)}}


class TestMechanism:

    def test_clipping_bounds_every_norm_and_keeps_small_updates(self):
        rng = np.random.default_rng(0)
        delta = _tree(rng, 16, scale=np.repeat([0.01, 1.0], 8)[:, None, None])
        delta["b"]["c"] = delta["b"]["c"] * np.repeat([0.01, 1.0], 8)[:, None]
        clip = jnp.full((16,), 0.5)
        clipped, unclipped, norms = dp.clip_and_noise(jax.random.key(0), delta, clip, 0.0)
        after = dp.peer_norms(clipped)
        assert bool(jnp.all(after <= clip * (1 + 1e-6)))
        np.testing.assert_array_equal(unclipped, (norms <= 0.5).astype(np.float32))
        np.testing.assert_array_equal(unclipped, np.repeat([1.0, 0.0], 8))
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[:8], clipped),
                                    jax.tree.map(lambda x: x[:8], delta), rtol=1e-6)
        np.testing.assert_allclose(after[8:], 0.5, rtol=1e-5)  # Large ones land on the sphere.

    def test_noise_has_the_stated_std(self):
        settings = dp.Privacy(noise_multiplier=1.0, nominal_peers=64)
        z_delta = settings.update_noise_multiplier
        assert z_delta == pytest.approx((1.0 - (6.4) ** -2) ** -0.5)
        params = {"w": jnp.zeros((64, 20_000))}
        state = dp.PrivacyState(params, params, jnp.linspace(0.05, 0.2, 64))
        everyone = jnp.ones(64, bool)
        noised, _, _ = dp.privatize(jax.random.key(1), params, state, everyone, settings)
        measured = np.asarray(noised["w"]).std(axis=1)
        # Every peer noises at the largest threshold, so the sum's noise covers its
        # sensitivity (max S): z_Delta * max S / sqrt(n) per peer.
        # 20,000 draws per peer: the std's relative standard error is 1/sqrt(40,000) = 0.5 %.
        np.testing.assert_allclose(measured, z_delta * 0.2 / 8.0, rtol=0.025)
        # Summed over the 64 peers the noise carries the central level z_Delta * S.
        common = dp.PrivacyState(params, params, jnp.full((64,), 0.1))
        noised, _, _ = dp.privatize(jax.random.key(2), params, common, everyone, settings)
        assert np.asarray(noised["w"]).sum(0).std() == pytest.approx(z_delta * 0.1, rel=0.02)
        # Only aggregating peers' thresholds count.
        half = jnp.arange(64) < 32  # Thresholds 0.05 .. ~0.124.
        noised, _, _ = dp.privatize(jax.random.key(3), params, state, half, settings)
        split = dp.noise_split(settings, jnp.int32(32))[0]
        np.testing.assert_allclose(np.asarray(noised["w"]).std(axis=1),
                                   split * float(state.clip[31]) / np.sqrt(32), rtol=0.025)

    def test_noise_split_uses_the_peers_actually_aggregating(self):
        settings = dp.Privacy(noise_multiplier=1.0, nominal_peers=64)
        z_delta, sigma_b, n = dp.noise_split(settings, jnp.int32(40))  # 24 dropped out.
        assert float(n) == 40 and float(sigma_b) == pytest.approx(2.0)
        assert float(z_delta) == pytest.approx((1.0 - 4.0**-2) ** -0.5, rel=1e-6)
        # z >= n/10 would make z_Delta unreal (the authors' code fails): n_0's split instead.
        z_delta, sigma_b, n = dp.noise_split(settings, jnp.int32(9))
        assert float(n) == 64 and float(z_delta) == pytest.approx(
            settings.update_noise_multiplier, rel=1e-6)
        drawn = settings._replace(split_on_aggregating=False)
        assert float(dp.noise_split(drawn, jnp.int32(40))[2]) == 64
        assert assemble.privacy(
            Config(dp=True, num_peers=64, dp_noise_peers="drawn")) == drawn._replace(
            noise_multiplier=0.5)

    @pytest.mark.slow
    def test_thresholds_stay_equal_under_exact_averaging(self, tmp_path):
        """One shared draw for the indicator's noise: at full participation on a grid every
        peer averages the same indicators, so every threshold S stays the same."""
        config = dataclasses.replace(TINY, dp=True, num_peers=16, group_size=4, key_dim=2,
                                     dp_noise_multiplier=0.5, max_iterations=2,
                                     local_batches=1, eval_every=5)
        state = runner.run(config, str(tmp_path)).state
        clip = np.asarray(state.stages["privacy"].clip)
        assert clip.min() == clip.max() != config.dp_initial_clip

    @pytest.mark.parametrize("quantile", [0.5, 0.8])
    def test_threshold_walks_to_the_target_quantile(self, quantile):
        rng = np.random.default_rng(3)
        norms = jnp.asarray(rng.lognormal(mean=0.0, sigma=0.5, size=4000), jnp.float32)
        settings = dp.Privacy(noise_multiplier=0.5, initial_clip=0.1, target_quantile=quantile,
                              nominal_peers=4000)
        clip = jnp.full((1,), settings.initial_clip)
        history = []
        for t in range(300):
            unclipped = (norms <= clip[0]).mean()
            clip = dp.update_clip(jax.random.key(t), clip, unclipped[None], jnp.int32(4000),
                                  settings)
            history.append(float(clip[0]))
        target = float(np.quantile(np.asarray(norms), quantile))
        assert np.median(history[-100:]) == pytest.approx(target, rel=0.05)
        assert history[0] > settings.initial_clip  # All clipped at first: S grows.

    def test_noise_multiplier_must_leave_z_delta_real(self):
        with pytest.raises(ValueError, match="needs z < 2\\*sigma_b = n/10 = 0.8"):
            dp.update_noise_multiplier(1.0, 8)
        assert dp.update_noise_multiplier(0.0, 8) == 0.0


class TestAccounting:

    def test_matches_dp_accounting_called_directly(self):
        z, delta = 0.8, 1e-5
        accountant = accounting.PrivacyAccountant(64, z, delta)
        for n in [64] * 30 + [48] * 10:
            accountant.record(n)
        accountant.record(0)  # Nobody aggregated: nothing released.
        got = accountant.epsilons()
        direct = rdp.RdpAccountant()
        gaussian = dp_accounting.GaussianDpEvent(z)
        for q, count in ((1.0, 30), (0.75, 10)):
            direct.compose(dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, gaussian), count))
        assert got["dp_releases"] == 40
        assert got["epsilon_rdp"] == pytest.approx(direct.get_epsilon(delta), rel=1e-9)
        bound = pld.PLDAccountant()
        bound.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(1.0, gaussian), 40))
        assert got["epsilon_pld"] == pytest.approx(bound.get_epsilon(delta), rel=1e-9)
        assert got["epsilon_authors"] == pytest.approx(
            0.75**2 * 40 * 32 / (2 * z**2) + math.log(1 / delta) / 31)

    def test_full_participation_pld_is_exact_and_below_rdp(self):
        accountant = accounting.PrivacyAccountant(16, 1.0, 1e-5)
        for _ in range(20):
            accountant.record(16)
        got = accountant.epsilons()
        direct = pld.PLDAccountant()
        direct.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 20))
        assert got["epsilon_pld"] == pytest.approx(direct.get_epsilon(1e-5), rel=1e-6)
        assert got["epsilon_pld"] < got["epsilon_rdp"]

    def test_state_round_trip_and_edge_cases(self):
        accountant = accounting.PrivacyAccountant(8, 0.5, 1e-3)
        assert accountant.epsilons()["epsilon_rdp"] == 0.0
        accountant.record(8)
        accountant.record(5)
        again = accounting.PrivacyAccountant.from_state(8, 0.5, 1e-3, accountant.state())
        assert again.epsilons() == accountant.epsilons()
        free = accounting.PrivacyAccountant(8, 0.0, 1e-3)
        free.record(8)
        assert free.epsilons()["epsilon_pld"] == math.inf


TINY = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=2, batch_size=8,
              eval_every=1, eval_peers="all", max_iterations=3, target_accuracy=1.0,
              checkpoint_every=0, dp_noise_multiplier=0.5)


class TestRuns:

    @pytest.mark.slow
    def test_zero_noise_huge_clip_unit_server_step_is_plain_marfl(self, tmp_path):
        plain = runner.run(TINY, str(tmp_path / "plain")).metrics
        private = runner.run(dataclasses.replace(
            TINY, dp=True, dp_noise_multiplier=0.0, dp_initial_clip=1e9, dp_server_lr=1.0,
            dp_server_momentum=0.0), str(tmp_path / "dp")).metrics
        for a, b in zip(plain, private, strict=True):
            assert a["accuracy"] == b["accuracy"]
            np.testing.assert_allclose([a["loss"], a["train_loss"]], [b["loss"], b["train_loss"]],
                                       rtol=1e-5)
            assert b["dp_unclipped"] == 1.0 and b["epsilon_rdp"] == math.inf

    @pytest.mark.slow
    @pytest.mark.parametrize("changes", [
        dict(), dict(dropout=0.3, dropout_timing="mid", mkd=True, mkd_iterations=2),
        dict(algorithm="fedavg", update_fraction=0.75, aggregate_fraction=0.75),
    ])
    def test_dp_runs_with_churn_and_mkd_and_counts_its_bytes(self, changes, tmp_path):
        config = dataclasses.replace(TINY, dp=True, mkd_batches=1, **changes)
        rows = runner.run(config, str(tmp_path)).metrics
        s = 4 * (784 * 200 + 200 + 200 * 10 + 10)
        for row in rows:
            assert 0 < row["dp_clip"] and 0 <= row["dp_unclipped"] <= 1
            assert np.isfinite(row["accuracy"]) and row["epsilon_rdp"] > 0
        assert rows[-1]["epsilon_rdp"] > rows[0]["epsilon_rdp"]
        if not changes:  # Full grid 2^3: 8 * 3 rounds * 1 mate * (3 payloads + indicator).
            assert rows[0]["bytes"] == 8 * 3 * (3 * s + 4)
        if config.mkd:
            assert rows[0]["mkd_bytes"] > 0 and np.isfinite(rows[0]["distill_loss"])
        if config.algorithm == "fedavg":  # 6 of 8 peers upload and download.
            assert rows[0]["present_peers"] == 6 and rows[0]["bytes"] == 2 * 6 * (3 * s + 4)

    @pytest.mark.slow
    def test_resume_reproduces_the_straight_run(self, tmp_path):
        config = dataclasses.replace(TINY, dp=True, dropout=0.3, max_iterations=4,
                                     checkpoint_every=2)
        straight = runner.run(config, str(tmp_path / "straight")).metrics
        runner.run(dataclasses.replace(config, max_iterations=2), str(tmp_path / "split"))
        resumed = runner.run(config, str(tmp_path / "split")).metrics

        def strip(rows):
            return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

        assert strip(resumed) == strip(straight)

    @pytest.mark.slow
    def test_an_interrupted_run_resumes_dps_state_exactly(self, tmp_path, monkeypatch):
        """DP's per-peer state lives in FLState.stages: interrupted after its checkpoint at
        iteration 2 (an exception out of the loop at iteration 3, before its row), the resumed
        run gives the straight run's rows and its final stage state bit for bit."""
        config = dataclasses.replace(TINY, dp=True, dropout=0.3, max_iterations=5,
                                     checkpoint_every=2)
        straight = runner.run(config, str(tmp_path / "straight"))
        finish = runner.Recorder.finish

        def interrupted(recorder, row):
            if row["iteration"] == 3:
                raise KeyboardInterrupt
            finish(recorder, row)

        monkeypatch.setattr(runner.Recorder, "finish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            runner.run(config, str(tmp_path / "split"))
        monkeypatch.setattr(runner.Recorder, "finish", finish)
        resumed = runner.run(config, str(tmp_path / "split"))

        def strip(rows):
            return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

        assert strip(resumed.metrics) == strip(straight.metrics)
        assert set(resumed.state.stages) == {"privacy"}
        chex.assert_trees_all_equal(resumed.state.stages, straight.state.stages)
        chex.assert_trees_all_equal(resumed.state.params, straight.state.params)

    def test_ledger_counts_dp_payloads_and_the_indicator(self):
        ledger = comm.Ledger(payload_bytes=100, payloads_per_message=3, scalar_bytes=4)
        row = ledger.record(np.full((3, 8), 2))
        assert row["bytes"] == 3 * 8 * (300 + 4)


def test_config_refuses_impossible_privacy():
    with pytest.raises(ConfigError, match="--dp_noise_multiplier=1.0 is not allowed; it must be "
                                          "a number < n/10 = 0.8 with n = 8 peers"):
        Config(dp=True, num_peers=8, key_dim=1, group_size=8, dp_noise_multiplier=1.0).validate()
    with pytest.raises(ConfigError, match="--dp is not allowed with --update_fraction=1"):
        Config(dp=True, aggregate_fraction=0.5).validate()
    with pytest.raises(ConfigError, match="--dp_target_quantile"):
        Config(dp_target_quantile=1.5).validate()
    assert Config(num_peers=64).privacy_delta == pytest.approx(64**-1.1)
    assert assemble.distillation(Config(dp=True, mkd=True)).include_ce is False
