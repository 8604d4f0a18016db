"""Named registries: one per concept (algorithms, wire models, models, datasets, partitions).

A registry maps a flag value to the thing that implements it. The config reads its choices from
the registries, so registering a new entry makes it a valid `--flag` value everywhere (the
launcher's flags, `Config.validate()`, the studies) without editing any list:

    from marfl_jax import models

    @models.MODELS.register("tiny_mlp")
    def tiny_mlp(num_classes, *, width=32):
        return MyFlaxModule(num_classes, width)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; the message names the flag (`--name`) and what is allowed."""


class Registry(Generic[T]):
    """Names -> implementations for one flag, in registration order."""

    def __init__(self, flag: str):
        self.flag = flag
        self._entries: dict[str, T] = {}

    def register(self, name: str, value: T | None = None, *, replace: bool = False):
        """Registers `value` under `name`; without `value`, a decorator that registers what it
        decorates. A name already taken is refused unless `replace`."""
        if not name or not isinstance(name, str):
            raise ValueError(f"--{self.flag}: a registered name must be a non-empty string")

        def add(entry: T) -> T:
            if name in self._entries and not replace:
                raise ValueError(f"--{self.flag}={name!r} is already registered; pass "
                                 "replace=True to override it")
            self._entries[name] = entry
            return entry

        return add if value is None else add(value)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry for `name`; ConfigError naming the flag and the allowed values if none."""
        if name not in self._entries:
            raise ConfigError(f"--{self.flag}={name!r} is not allowed; choose one of: "
                              + ", ".join(self._entries))
        return self._entries[name]

    __getitem__ = get

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry(--{self.flag}: {', '.join(self._entries)})"
