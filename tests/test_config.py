"""Tests of config validation: every bad value names its flag and what is allowed."""

import dataclasses

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
