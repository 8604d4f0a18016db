"""The studies, one module each, found by name: a module here that defines `STUDY` (a
`marfl_jax.sweep.Study`) is a valid `launch.compare --study` and, with a `section`, part of
`launch.reproduce` and its report. A study declares its own settings and their defaults
(`STUDY.options`); adding a study adds one module and touches nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import pkgutil
from collections.abc import Mapping, Sequence

from marfl_jax import scales
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


def check_options(scale: Scale) -> None:
    """ValueError if `scale` gives a setting to a study that does not exist or has no such
    option (before anything runs)."""
    unknown = [name for name in scale.options if name not in studies()]
    if unknown:
        raise ValueError(f"scale {scale.name}: options for unknown studies "
                         f"{', '.join(unknown)}; studies: {', '.join(studies())}")
    for name, values in scale.options.items():
        get(name).check_option_names(values, f"scale {scale.name}")


def compare_scale(study: Study, sizes: Mapping | None = None, mnist: Mapping | None = None,
                  options: Sequence[tuple[str, Sequence[str]]] = ()) -> Scale:
    """The Scale `launch.compare` runs `study` at: `SCALES["small"]`'s shared setting and size
    (without its settings for the reproduction's studies), the study's `defaults`, then the
    given `sizes` (Scale fields), `mnist` (Config fields) and `options` ((name, values as text)
    pairs of the study's own settings) on top. ValueError naming --option for a setting the
    study does not have, before anything runs."""
    values = study.parse_options(options)
    scale = dataclasses.replace(scales.SCALES["small"], options={})
    scale = scales.with_defaults(scale, study.defaults)
    scale = scales.with_defaults(scale, {**(sizes or {}), "mnist": dict(mnist or {})})
    return scales.with_options(scale, study.name, values) if values else scale


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
    check_options(scale)
    return [(get(name), get(name).configs(scale, os.path.join(workdir, name)))
            for name in names]
