"""The studies, one module each, found by name: a module here that defines `STUDY` (a
`marfl_jax.sweep.Study`) is a valid `launch.compare --study` and, with a `section`, part of
`launch.reproduce`. Adding a study adds one module and touches nothing else.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from collections.abc import Sequence

from marfl_jax.config import Config
from marfl_jax.scales import Scale
from marfl_jax.sweep import Study


@functools.cache
def studies() -> dict[str, Study]:
    """Every study of this package by name (its modules imported once)."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        study = getattr(module, "STUDY", None)
        if isinstance(study, Study):
            found[study.name] = study
    return dict(sorted(found.items()))


def get(name: str) -> Study:
    return studies()[name]


def paper_names() -> tuple[str, ...]:
    """The paper reproduction's studies, in the report's order."""
    return tuple(name for name, study in sorted(
        studies().items(), key=lambda item: (item[1].section is None, item[1].section or 0))
        if study.section is not None)


def paper(scale: Scale, workdir: str, names: Sequence[str] | None = None
          ) -> list[tuple[Study, list[Config]]]:
    """The reproduction's studies `names` (default all) at `scale`, runs under
    `workdir`/<name>/, each with its configs."""
    allowed = paper_names()
    names = allowed if names is None else tuple(names)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"--experiments: unknown {', '.join(unknown)}; allowed: "
                         f"{', '.join(allowed)}")
    return [(get(name), get(name).configs(scale, os.path.join(workdir, name)))
            for name in names]
