"""Tests of config validation: every bad value names its flag and what is allowed."""

import dataclasses

import pytest
from absl.testing import parameterized

from marfl_jax.config import Config, ConfigError


class ConfigTest(parameterized.TestCase):

    def test_defaults_are_valid(self):
        Config().validate()

    @parameterized.parameters(
        ("dataset", "cifar", "--dataset", "mnist10k"),
        ("model", "resnet", "--model", "cnn"),
        ("algorithm", "sgd", "--algorithm", "marfl, fedavg, arfl, rdfl, gossip"),
        ("schedule", "x", "--schedule", "authors, mixed_radix"),
        ("wire", "x", "--wire", "allgather, butterfly"),
        ("partition", "random", "--partition", "dirichlet"),
        ("num_peers", 0, "--num_peers", ">= 1"),
        ("group_size", 1, "--group_size", ">= 2"),
        ("key_dim", 0, "--key_dim", ">= 1"),
        ("local_batches", 0, "--local_batches", ">= 1"),
        ("batch_size", -3, "--batch_size", ">= 1"),
        ("learning_rate", 0.0, "--learning_rate", "> 0"),
        ("momentum", 1.0, "--momentum", "[0, 1)"),
        ("dirichlet_alpha", 0.0, "--dirichlet_alpha", "> 0"),
        ("eval_every", 0, "--eval_every", ">= 1"),
        ("eval_peers", "some", "--eval_peers", "'mean'"),
        ("target_accuracy", 1.5, "--target_accuracy", "(0, 1]"),
        ("max_iterations", 0, "--max_iterations", ">= 1"),
        ("conv_impl", "fft", "--conv_impl", "one of"),
    )
    def test_bad_value_names_flag_and_allowed_values(self, name, value, flag, allowed):
        config = dataclasses.replace(Config(), **{name: value})
        with self.assertRaises(ConfigError) as error:
            config.validate()
        self.assertIn(flag, str(error.exception))
        self.assertIn(allowed, str(error.exception))

    def test_json_round_trip(self):
        import json
        config = Config(num_peers=8, seed=3)
        self.assertEqual(Config.from_dict(json.loads(config.to_json())), config)
        with self.assertRaisesRegex(ConfigError, "unknown"):
            Config.from_dict({"nope": 1})


def test_fractions_count_peers_as_the_authors_do():
    """int(0.29 * 100) is 28 in floating point; the authors' int(N * percent / 100) is 29."""
    from marfl_jax.config import peer_count

    assert peer_count(0.29, 100) == 29 and int(0.29 * 100) == 28
    assert peer_count(0.29, 125) == 36 and peer_count(1.0, 7) == 7 and peer_count(0.5, 5) == 2
    assert Config(num_peers=100, aggregate_fraction=0.29).aggregating_peers == 29


def test_fractions_that_draw_nobody_are_refused():
    with pytest.raises(ConfigError, match="--update_fraction=0.1 .* 0 peers would take part"):
        Config(num_peers=8, update_fraction=0.1).validate()
    with pytest.raises(ConfigError, match="--aggregate_fraction=0.05 .*--num_peers=16"):
        Config(num_peers=16, aggregate_fraction=0.05).validate()
    Config(num_peers=10, update_fraction=0.1, key_dim=2).validate()


def test_choices_come_from_the_registries():
    from marfl_jax import ALGORITHMS

    ALGORITHMS.register("test_only", lambda settings: ALGORITHMS.get("arfl")(settings))
    try:
        Config(algorithm="test_only").validate()
    finally:
        ALGORITHMS.unregister("test_only")
    with pytest.raises(ConfigError, match="--algorithm='test_only' is not allowed"):
        Config(algorithm="test_only").validate()


def test_every_field_is_in_one_section():
    from marfl_jax.config import SECTIONS

    listed = [name for names in SECTIONS.values() for name in names]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(Config))
    assert Config().section("dp")["dp_noise_peers"] == "aggregating"


def test_the_aggregator_is_a_registered_rule():
    assert Config().aggregator == "mean"
    assert Config(aggregator="median").validate().aggregator == "median"
    with pytest.raises(ConfigError, match="--aggregator='trimmed' is not allowed; choose one "
                                          "of: mean, median"):
        Config(aggregator="trimmed").validate()
    assert Config(aggregator="median", codec="int8").validate().codec == "int8"  # Decoded.
    assert Config(codec="int8").validate().aggregator == "mean"
    with pytest.raises(ConfigError, match="--aggregator=median is not allowed with --dp"):
        Config(aggregator="median", dp=True).validate()


@pytest.mark.parametrize("rule", ["centered_clip", "centered_clip_previous",
                                  "self_centered_clip"])
def test_a_clipping_rule_needs_its_radius(rule):
    """No default radius: ByzFL's 100 is above every difference of these models' copies, so
    the rule would silently be the mean."""
    with pytest.raises(ConfigError, match=f"--aggregator={rule} needs --clip_tau > 0"):
        Config(aggregator=rule).validate()
    assert Config(aggregator=rule, clip_tau=1.0).validate().clip_tau == 1.0
    assert Config(aggregator="median").validate().clip_tau == 0.0  # Not a clipping rule.


@pytest.mark.parametrize("value", ["two", "-1", "1.5", "", -1, 1.5, True, None])
def test_a_bad_aggregator_f_names_the_flag_and_its_values(value):
    with pytest.raises(ConfigError, match=r"--aggregator_f=.* it must be 'auto' or an integer "
                                          ">= 0"):
        Config(aggregator="trimmed_mean", aggregator_f=value).validate()


def test_aggregator_f_is_auto_or_an_integer_however_given():
    assert Config().aggregator_f == "auto"
    assert Config(aggregator_f="2") == Config(aggregator_f=2) == Config(aggregator_f=" 2 ")
    assert Config(aggregator_f="2").aggregator_f == 2  # A flag's string, read as the int.
    assert dataclasses.replace(Config(), aggregator_f="0").aggregator_f == 0


def test_aggregator_f_from_a_flagfile_and_the_flags(tmp_path):
    from absl import flags

    import launch.train  # noqa: F401  (defines the flags)
    from launch.flags import config_from_flags
    from marfl_jax.scales import config_from_flagfile

    path = tmp_path / "run.cfg"
    path.write_text("--aggregator=trimmed_mean\n--aggregator_f=1\n")
    assert config_from_flagfile(str(path)).aggregator_f == 1
    assert flags.FLAGS["aggregator_f"].default == "auto"
    try:
        flags.FLAGS(["train", f"--flagfile={path}"])
        assert config_from_flags().aggregator_f == 1
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train", "--aggregator_f=auto"])
        assert config_from_flags() == Config()
    finally:
        flags.FLAGS.unparse_flags()


def test_auto_f_is_resolved_for_the_algorithms_largest_group():
    """The honest-majority check asks the f the rule gets: 'auto' is always allowed."""
    attacked = dict(byzantine_fraction=0.1, attack="sign_flip")
    config = Config(aggregator="trimmed_mean", **attacked).validate()  # M = 4.
    assert config.tolerated_f(4) == 1 and Config(aggregator_f=2).tolerated_f(4) == 2
    fedavg = Config(aggregator="krum", algorithm="fedavg", model="mlp", **attacked).validate()
    assert fedavg.tolerated_f(fedavg.num_peers) == 7  # ceil(0.1 * 64), a server of N = 64.
    Config(aggregator="trimmed_mean", algorithm="gossip").validate()  # Pairs: f = 0.
    with pytest.raises(ConfigError, match="--aggregator_f=2 .* no honest majority .* "
                                          "--aggregator_f=auto"):
        Config(aggregator="trimmed_mean", aggregator_f="2").validate()


def _older_run(tmp_path, **values):
    """A workdir whose config.json an older run wrote (aggregator_f an int: the old default
    was 0)."""
    import json

    recorded = json.loads(Config(workdir=str(tmp_path), **values).to_json())
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    return recorded


def test_an_older_run_with_an_integer_f_resumes(tmp_path):
    from marfl_jax import workdir as files

    robust = dict(aggregator="trimmed_mean", byzantine_fraction=0.1, attack="sign_flip")
    assert _older_run(tmp_path, aggregator_f=1, **robust)["aggregator_f"] == 1
    for given in (1, "1", "auto"):  # The flag as given now; auto: f = 1 in groups of 4.
        previous = files.previous_config(Config(workdir=str(tmp_path), aggregator_f=given,
                                                **robust), str(tmp_path))
        assert previous.aggregator_f == 1
    with pytest.raises(ConfigError, match=r"differs in: --aggregator_f \(f = 1 there, 0 here\)"):
        files.previous_config(Config(workdir=str(tmp_path), aggregator_f=0, **robust),
                              str(tmp_path))
    # The mean reads no f: an older run of it (the former default 0) resumes with 'auto'.
    _older_run(tmp_path, aggregator_f=0)
    assert files.previous_config(Config(workdir=str(tmp_path)), str(tmp_path)).aggregator_f == 0
