"""absl flags generated from `marfl_jax.config.Config`: one flag per field, same name, same
default, same help; enum fields become enum flags. Keeps the flags and the config in step."""

from __future__ import annotations

import dataclasses

from absl import flags

from marfl_jax.config import Config, field_choices, field_help


def define_config_flags() -> None:
    """Defines a flag for every Config field (call once, at import of a launcher)."""
    for f in dataclasses.fields(Config):
        default, help_text, choices = f.default, field_help(f), field_choices(f)
        if choices:
            # A plain string flag: Config.validate() names the allowed values itself.
            help_text = f"{help_text} One of: {', '.join(choices)}."
            flags.DEFINE_string(f.name, default, help_text)
        elif isinstance(default, bool):
            flags.DEFINE_bool(f.name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(f.name, default, help_text)
        elif isinstance(default, float):
            flags.DEFINE_float(f.name, default, help_text)
        else:
            flags.DEFINE_string(f.name, default, help_text)


def config_from_flags() -> Config:
    """The Config the parsed flags describe (not yet validated)."""
    values = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(Config)}
    return Config(**values)
