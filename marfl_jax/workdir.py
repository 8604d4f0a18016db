"""A run's files: `config.json`, `metrics.jsonl`, `summary.json` and `checkpoints/` (orbax).

Every write leaves a complete file at any moment of an interruption: whole files are written to
a temporary name and renamed over the old one; rows are appended one line at a time and flushed
(a torn last line is dropped on reading).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import sys
import warnings
from typing import Any

import jax
from absl import logging

from marfl_jax import algorithms, rules, sharding
from marfl_jax.config import Config, ConfigError

# Fields that may change between a run and its resumption (they do not change the trajectory).
RESUMABLE_CHANGES = ("max_iterations", "checkpoint_every", "workdir", "memory_limit_gb",
                     "plan_budget_s", "wandb_project")


class WorkdirInUseError(ConfigError):
    """Another live process holds the workdir's lock."""


LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked(workdir: str):
    """Holds `WORKDIR/.lock` (an exclusive `fcntl.flock`) for the duration of the block, with
    this process's id written in it; refuses at once a workdir another process holds.

    The OS drops the lock when its holder's file is closed, however the process ends (SIGKILL
    included), so a dead run leaves nothing that blocks: the file itself stays, unlocked.
    flock locks belong to the open file, so a second `locked` on one workdir in the same process
    is refused too. A workdir this call created and the run left empty (refused before it wrote
    anything) is removed again.

    A workdir that cannot be made, or in which the lock file cannot be written, raises
    ConfigError in one line naming --workdir and the OS's reason (`usable`)."""
    created = not os.path.exists(workdir)
    path = os.path.join(workdir, LOCK_FILE)
    fd = usable(workdir, path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            raise WorkdirInUseError(
                f"--workdir={workdir} is in use by another run (process {holder} holds {path}); "
                "wait for it to end, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        if created and os.listdir(workdir) == [LOCK_FILE]:
            os.remove(path)
            os.rmdir(workdir)
        os.close(fd)  # Releases the lock.


def usable(workdir: str, path: str) -> int:
    """Makes `workdir` (and its parents) if need be and opens its lock file `path` for writing
    (the file descriptor); ConfigError, in one line, when either fails."""
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)  # The nearest folder (or file) that exists.
    if not os.path.isdir(existing):
        where = "it" if existing == os.path.abspath(workdir) else existing
        raise ConfigError(f"--workdir={workdir} cannot be made: {where} is a file, not a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--workdir={workdir} cannot be made: {_reason(error, workdir)}"
                          ) from None
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise ConfigError(f"--workdir={workdir} is not writable: {_reason(error, workdir)}"
                          ) from None


def _reason(error: OSError, workdir: str) -> str:
    """The OS's reason for `error`, with the path it concerns when that is not `workdir`
    (a parent that is a file, a lock file that cannot be created)."""
    reason = error.strerror or type(error).__name__
    if error.filename and os.path.normpath(str(error.filename)) != os.path.normpath(workdir):
        reason += f" ({error.filename})"
    return reason


def strict_json(value):
    """`value` with every non-finite float (NaN, +-inf) replaced by None, so that it is
    written as strict JSON (null) rather than Python's NaN / Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def dumps(value, **kwargs) -> str:
    """Strict JSON: non-finite numbers become null (`strict_json`)."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


def write_atomically(path: str, text: str) -> None:
    """Replaces `path` by `text` in one rename (readers see the old or the new file, whole)."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def previous_config(config: Config, workdir: str) -> Config | None:
    """The config of the run already in workdir (None if there is none); refuses a different
    run. A fresh run clears stale checkpoints and rows that no config.json accounts for."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        for stale in ("checkpoints", "metrics.jsonl", "summary.json", "plan.json", "tb"):
            stale_path = os.path.join(workdir, stale)
            if os.path.exists(stale_path) and sharding.is_primary():
                logging.warning("fresh run: removing %s, left without a config.json", stale_path)
                if os.path.isdir(stale_path):
                    shutil.rmtree(stale_path)
                else:
                    os.remove(stale_path)
        return None
    with open(path) as f:
        previous = Config.from_dict(json.load(f))
    differences = []
    for name in (f.name for f in dataclasses.fields(Config)):
        if name in RESUMABLE_CHANGES or (name == "aggregator_f"
                                         and previous.aggregator != config.aggregator):
            continue  # Another rule is reported as --aggregator.
        there, here = _compared(previous, name), _compared(config, name)
        if there != here:
            differences.append(f"--{name}" if name != "aggregator_f" else
                               f"--{name} (f = {there} there, {here} here)")
    if differences:
        raise ConfigError(
            f"--workdir={workdir} holds a run with a different config (differs in: "
            f"{', '.join(differences)}); use another --workdir or delete it")
    return previous


def _compared(config: Config, name: str):
    """What a resumption compares of the field `name`: its value, but for --aggregator_f the f
    the group rule gets (`Config.tolerated_f`; None under the mean, which reads no f): 'auto',
    '1' and the 1 of an older config.json are one setting where they give the same f, and an
    older run of the mean (its config.json holds the former default 0) resumes with 'auto'."""
    if name != "aggregator_f":
        return getattr(config, name)
    if rules.RULES.get(config.aggregator).exact_mean:
        return None
    run_algorithm = algorithms.make_algorithm(config.settings(algorithms.Settings))
    return config.tolerated_f(run_algorithm.max_group_size)


def read_rows(path: str, before: int) -> list[dict]:
    """The rows of iterations 0 .. before-1 (a torn last line is dropped; rows at or after
    `before` are left to be rewritten). Refuses rows that are not 0, 1, 2, ... in order or do not
    reach `before`: the checkpoint and the rows would disagree."""
    rows = []
    if before and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if row["iteration"] >= before:
                    break
                if row["iteration"] != len(rows):
                    raise ConfigError(
                        f"{path}: row {len(rows)} is iteration {row['iteration']}; the rows "
                        "must be iterations 0, 1, 2, ... in order. Delete the workdir to "
                        "start again")
                rows.append(row)
    if len(rows) != before:
        raise ConfigError(f"{path} holds {len(rows)} rows but the checkpoint is after iteration "
                          f"{before - 1}; delete the workdir to start again")
    return rows


class Rows:
    """metrics.jsonl: the rows kept from before a resumption, then one appended per iteration,
    in strict JSON (a non-finite number is written as null).

    Opening rewrites the kept rows atomically (a kill at any moment leaves either the old file
    or the kept rows), then appends."""

    def __init__(self, path: str, kept: list[dict], write: bool = True):
        self._file = None
        if write:
            write_atomically(path, "".join(dumps(row) + "\n" for row in kept))
            self._file = open(path, "a")  # noqa: SIM115 (closed by close()).

    def append(self, row: dict) -> None:
        if self._file is not None:
            self._file.write(dumps(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Checkpoints:
    """The last two FLStates plus host-side JSON (ledger, iteration), saved with orbax.

    Two are kept so that one that cannot be restored (a file truncated by a full disk, a copy
    cut short) falls back to the one before it."""

    KEEP = 2

    def __init__(self, directory: str):
        import orbax.checkpoint as ocp  # Deferred: a heavy import only runs need.

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.KEEP,
                                                 enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def save(self, iteration: int, state, host: dict) -> None:
        args = self._ocp.args
        self._manager.save(iteration, args=args.Composite(
            state=args.StandardSave(state), host=args.JsonSave(host)), force=True)
        self._manager.wait_until_finished()

    def restore(self, abstract, mesh=None, older=()) -> tuple[tuple, dict]:
        """The latest state that restores: its leaves (as the tuple `abstract` describes),
        placed as `sharding.shard_peers` would (one device without mesh), and the host JSON.
        `older`: (abstract, convert) pairs, earlier layouts of the state; a checkpoint that
        does not restore as `abstract` is tried as each, then converted to the current one.

        A checkpoint that fails to restore is reported in one line and the one before it is
        tried; the failed ones are then removed (the run saves those steps again as it
        redoes them). When none restores, raises ConfigError naming the files to remove."""
        placement = (sharding.by_peer(mesh) if mesh is not None
                     else jax.sharding.SingleDeviceSharding(jax.devices()[0]))

        def placed(tree):
            return jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), tree)

        layouts = [(placed(abstract), None)] + [(placed(a), convert) for a, convert in older]
        failed = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, host = self._restore_step(step, layouts)
            except Exception as error:  # noqa: BLE001 (any failure: try the one before).
                logging.warning("checkpoint %s cannot be restored (%s); trying the one "
                                "before it", os.path.join(self.directory, str(step)),
                                restore_failure(error))
                _quiet_closed_loop_callbacks()
                failed.append(step)
                continue
            for bad in failed:
                self._manager.delete(bad)
            if failed:
                logging.warning("restored checkpoint %s instead; removed the ones that "
                                "failed (%s)", os.path.join(self.directory, str(step)),
                                ", ".join(map(str, failed)))
            return state, host
        raise ConfigError(
            f"no checkpoint under {self.directory} can be restored (tried "
            f"{', '.join(map(str, failed))}); remove {self.directory} to start the run again "
            "from iteration 0 (its rows are rewritten), or use another --workdir")

    def _restore_step(self, step: int, layouts) -> tuple[Any, dict]:
        """Checkpoint `step` as the first of `layouts` ((abstract, convert) pairs) whose tree
        structure it has; the first error when none restores."""
        args = self._ocp.args
        first_error = None
        for layout, convert in layouts:
            try:
                with draining_event_loops():
                    restored = self._manager.restore(step, args=args.Composite(
                        state=args.StandardRestore(layout), host=args.JsonRestore()))
            except Exception as error:  # noqa: BLE001 (raised below if no layout restores).
                first_error = first_error or error
                if "tree structures do not match" in str(error):
                    continue  # Another layout of the state: try the older ones.
                break  # A damaged checkpoint: no other layout reads it.
            state = restored["state"]
            return (state if convert is None else convert(state)), restored["host"]
        raise first_error


def _quiet_closed_loop_callbacks() -> None:
    """Drops the reports of one harmless exception from then on: after a failed restore,
    tensorstore's reads still in flight complete on its threads and call back into the asyncio
    loop orbax closed, each printing a traceback ('Event loop is closed') through
    sys.unraisablehook. Every other unraisable exception is reported as before."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_closed_loops", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.quiets_closed_loops = True
    sys.unraisablehook = hook


def restore_failure(error: BaseException, limit: int = 400) -> str:
    """Why a restore failed, in one line: the error and its cause (tensorstore's reason, e.g.
    'OUT_OF_RANGE: ... byte range ... is not valid'), without orbax's dump of the TensorStore
    spec, cut at `limit` characters."""
    parts = []
    while error is not None and len(parts) < 3:
        text = str(error).split(" See full TensorStore details")[0].rstrip(".")
        parts.append(" ".join(f"{type(error).__name__}: {text}".split()))
        error = error.__cause__
    reason = "; ".join(parts)
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose close() first cancels the tasks still pending and runs them to
    their end, as asyncio.run does (orbax closes its loop without: after one read of a failed
    restore raises, the reads of the other arrays stay pending, and their coroutines, collected
    later, each print a traceback with the TensorStore spec, and tensorstore's callbacks find a
    closed loop)."""

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            pending = [task for task in asyncio.all_tasks(self) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:  # Their errors are the failed restore's, already raised and reported.
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()


@contextlib.contextmanager
def draining_event_loops():
    """Within the block, asyncio.new_event_loop() makes `_DrainingEventLoop`s (through an event
    loop policy; the one before it is put back after). Policies are deprecated from Python 3.14
    (their warning is silenced here) and where they are gone, the block changes nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        base = getattr(asyncio, "DefaultEventLoopPolicy", None)
        if base is None:
            previous = None
        else:
            policy = type("_DrainingPolicy", (base,), {"_loop_factory": _DrainingEventLoop})()
            previous = asyncio.get_event_loop_policy()
            asyncio.set_event_loop_policy(policy)
    try:
        yield
    finally:
        if previous is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                asyncio.set_event_loop_policy(previous)


def write_json(path: str, value: dict) -> None:
    write_atomically(path, dumps(value, indent=2))


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
