"""The package's layout says its architecture: one name per module, every registry exported,
and the Config read into pieces only by `marfl_jax.assemble`."""

import collections
import os
import re

import marfl_jax
from marfl_jax.registry import Registry

PACKAGE = os.path.dirname(marfl_jax.__file__)


def _modules():
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(folder, name), PACKAGE)


def test_no_two_modules_outside_the_studies_share_a_name():
    by_name = collections.defaultdict(list)
    for path in _modules():
        if not path.startswith("experiments" + os.sep) and not path.endswith("__init__.py"):
            by_name[os.path.basename(path)].append(path)
    assert {name: paths for name, paths in by_name.items() if len(paths) > 1} == {}


def test_every_registry_is_exported_from_the_package():
    defined = set()
    for path in _modules():
        with open(os.path.join(PACKAGE, path)) as f:
            defined |= set(re.findall(r"^([A-Z_]+)\s*:\s*Registry", f.read(), re.M))
    assert len(defined) >= 8
    for name in defined:
        assert isinstance(getattr(marfl_jax, name, None), Registry), name
        assert name in marfl_jax.__all__, name


def test_no_kernel_reads_a_config():
    """Only the assembly (and the host around it) reads Config fields into pieces: no `.of(config)`
    constructor anywhere, and no module of the simulation imports the Config."""
    host = {"assemble.py", "runner.py", "config.py", "sweep.py", "scales.py", "report.py",
            "tracking.py", "runtime.py", "workdir.py", "__init__.py", "watch.py", "plotting.py"}
    for path in _modules():
        with open(os.path.join(PACKAGE, path)) as f:
            text = f.read()
        assert not re.search(r"def of\(cls, config", text), path
        if path.startswith("experiments" + os.sep) or os.path.basename(path) in host:
            continue
        assert not re.search(r"from marfl_jax\.config import .*\bConfig\b", text), path
