"""A run's files: atomic rewrites, contiguous rows, stale checkpoints, resuming inside MKD."""

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from marfl_jax import Config, ConfigError, runner, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=1, batch_size=8,
              eval_every=1, eval_peers="3", max_iterations=4, target_accuracy=1.0,
              checkpoint_every=2)


def _rows(path):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in path]


def test_write_atomically_leaves_no_partial_file(tmp_path):
    path = tmp_path / "file.json"
    workdir.write_atomically(str(path), "old")
    workdir.write_atomically(str(path), "new")
    assert path.read_text() == "new" and not (tmp_path / "file.json.tmp").exists()


def test_rows_must_be_contiguous_and_reach_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": t}) + "\n" for t in (0, 1, 3)))
    with pytest.raises(ConfigError, match="row 2 is iteration 3"):
        workdir.read_rows(str(path), 4)
    path.write_text("".join(json.dumps({"iteration": t}) + "\n" for t in (0, 1)) + '{"iter')
    assert [r["iteration"] for r in workdir.read_rows(str(path), 2)] == [0, 1]  # Torn line.
    with pytest.raises(ConfigError, match="holds 2 rows but the checkpoint is after iteration 2"):
        workdir.read_rows(str(path), 3)


@pytest.mark.slow
def test_resume_rewrites_the_rows_atomically(tmp_path, monkeypatch):
    """Kill the rewrite itself: the file on disk is the old one, whole, and a rerun recovers."""
    straight = runner.run(TINY, str(tmp_path / "straight")).metrics
    short = dataclasses.replace(TINY, max_iterations=2)
    runner.run(short, str(tmp_path / "run"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    before = metrics.read_text()

    original = workdir.write_atomically

    def killed(path, text):
        if not path.endswith("metrics.jsonl"):
            return original(path, text)
        with open(f"{path}.tmp", "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(workdir, "write_atomically", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run(TINY, str(tmp_path / "run"))
    assert metrics.read_text() == before
    monkeypatch.undo()
    assert _rows(runner.run(TINY, str(tmp_path / "run")).metrics) == _rows(straight)


@pytest.mark.slow
def test_a_fresh_run_does_not_restore_stale_checkpoints(tmp_path):
    """Checkpoints left behind without a config.json (another run's, further along) are not
    resumed: the run and its resumption equal a run in an empty workdir."""
    other = dataclasses.replace(TINY, seed=7, max_iterations=4, checkpoint_every=1)
    runner.run(other, str(tmp_path / "run"))
    os.remove(tmp_path / "run" / "config.json")
    fresh = runner.run(dataclasses.replace(TINY, max_iterations=2), str(tmp_path / "run"))
    assert fresh.metrics[0]["iteration"] == 0 and len(fresh.metrics) == 2
    resumed = runner.run(TINY, str(tmp_path / "run")).metrics
    assert _rows(resumed) == _rows(runner.run(TINY, str(tmp_path / "clean")).metrics)


@pytest.mark.slow
def test_resume_inside_the_mkd_window(tmp_path):
    config = dataclasses.replace(TINY, mkd=True, mkd_iterations=3, mkd_batches=1,
                                 checkpoint_every=1, max_iterations=4)
    straight = runner.run(config, str(tmp_path / "straight")).metrics
    runner.run(dataclasses.replace(config, max_iterations=2), str(tmp_path / "split"))
    resumed = runner.run(config, str(tmp_path / "split")).metrics
    assert [("distill_weight" in r) for r in resumed] == [True, True, True, False]
    assert _rows(resumed) == _rows(straight)


@pytest.mark.slow
def test_peer_chunk_is_not_a_resumable_change(tmp_path):
    runner.run(dataclasses.replace(TINY, max_iterations=1), str(tmp_path))
    with pytest.raises(ConfigError, match="--peer_chunk"):
        runner.run(dataclasses.replace(TINY, peer_chunk=3), str(tmp_path))


@pytest.mark.smoke
def test_a_workdir_held_by_another_run_is_refused_at_once(tmp_path):
    """flock locks belong to the open file: a second open in this process conflicts too."""
    with workdir.locked(str(tmp_path)):
        with pytest.raises(workdir.WorkdirInUseError, match=re.escape(
                f"--workdir={tmp_path} is in use by another run (process {os.getpid()} holds "
                f"{tmp_path / '.lock'})")):
            runner.run(TINY, str(tmp_path))
    assert not (tmp_path / "config.json").exists()  # Refused before any work.
    with workdir.locked(str(tmp_path)):  # Released with the block.
        pass


def test_a_killed_holder_leaves_nothing_that_blocks(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom marfl_jax import workdir\n"
         "with workdir.locked(sys.argv[1]):\n    print('locked', flush=True)\n"
         "    time.sleep(300)\n", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"process {holder.pid} holds"):
            with workdir.locked(str(tmp_path)):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder.
        holder.wait()
    with workdir.locked(str(tmp_path)):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


@pytest.mark.smoke
# A failed restore's tensorstore reads may still call back into orbax's closed event loop
# ('Event loop is closed'). In a run, workdir's unraisable hook drops exactly those; under
# pytest the per-test hook replaces it, so this test cannot see that filter and turning the
# report into an error failed intermittently (2 of 5 clean-clone CI runs, 2026-12-07/08).
# What is asserted is the fallback.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_checkpoint_that_cannot_be_restored_falls_back_to_the_one_before(tmp_path, caplog):
    config = dataclasses.replace(TINY, checkpoint_every=1, max_iterations=6)
    straight = runner.run(config, str(tmp_path / "straight")).metrics
    run = tmp_path / "run"
    runner.run(dataclasses.replace(config, max_iterations=4), str(run))
    checkpoints = run / "checkpoints"
    assert sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit()) == [3, 4]
    blobs = [os.path.join(folder, name)
             for folder, _, names in os.walk(checkpoints / "4" / "state")
             if os.path.basename(folder) == "d" for name in names]
    assert blobs
    for blob in blobs:  # The arrays' data cut short; the metadata intact.
        os.truncate(blob, 8)
    with caplog.at_level(logging.WARNING):
        resumed = runner.run(config, str(run)).metrics
    assert f"checkpoint {checkpoints / '4'} cannot be restored" in caplog.text
    assert _rows(resumed) == _rows(straight)
    assert _rows(json.loads(line) for line in open(run / "metrics.jsonl")) == _rows(straight)
    # When none restores, the run stops and names what to remove. (Every file emptied.)
    for step in os.listdir(checkpoints):
        for folder, _, names in os.walk(checkpoints / step / "state"):
            for name in names:
                os.truncate(os.path.join(folder, name), 0)
    with pytest.raises(ConfigError, match=re.escape(
            f"no checkpoint under {checkpoints} can be restored (tried 6, 5); remove "
            f"{checkpoints} to start the run again")):
        runner.run(config, str(run))


@pytest.mark.parametrize("where,expected", [
    ("/proc/nope", "--workdir=/proc/nope cannot be made: No such file or directory"),
    ("/proc/nope/run", "--workdir=/proc/nope/run cannot be made: No such file or directory "
     "(/proc/nope)"),
    ("file", "--workdir={tmp}/file cannot be made: it is a file, not a folder"),
    ("file/run", "--workdir={tmp}/file/run cannot be made: {tmp}/file is a file, not a folder"),
])
def test_a_workdir_that_cannot_be_made_is_one_line(where, expected, tmp_path):
    (tmp_path / "file").write_text("")
    path = where if where.startswith("/") else str(tmp_path / where)
    with pytest.raises(ConfigError) as raised:
        with workdir.locked(path):
            pass
    assert str(raised.value) == expected.format(tmp=tmp_path)
    assert (tmp_path / "file").read_text() == ""


def _read_only_folder(tmp_path) -> str:
    """A folder this process cannot create files in: a tmp_path folder made read-only, or (for
    root, whom file modes do not stop) /sys, a read-only file system."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (str(folder), "/sys"):
        try:
            os.close(os.open(os.path.join(candidate, workdir.LOCK_FILE),
                             os.O_RDWR | os.O_CREAT, 0o644))
            os.remove(os.path.join(candidate, workdir.LOCK_FILE))
        except OSError:
            return candidate
    return None


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    folder = _read_only_folder(tmp_path)
    if folder is None:  # Nothing here refuses this process: the OS's refusal is simulated.
        folder, real_open = str(tmp_path / "refusing"), os.open
        os.mkdir(folder)

        def refusing_open(path, *args, **kwargs):
            if os.path.dirname(os.path.abspath(path)) == folder:
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(workdir.os, "open", refusing_open)
    with pytest.raises(ConfigError, match=re.escape(
            f"--workdir={folder} is not writable: ") + r"\S.* \(" + re.escape(
            os.path.join(folder, workdir.LOCK_FILE) + ")")):
        with workdir.locked(folder):
            pass


@pytest.mark.smoke
def test_the_launcher_names_the_workdir_it_cannot_make_in_one_line(tmp_path):
    """Before any work: no data is loaded, nothing compiled; exit status 2."""
    result = subprocess.run(
        [sys.executable, "-m", "launch.train", "--model=mlp", "--workdir=/proc/nope"], cwd=ROOT,
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --workdir=/proc/nope cannot be made: No such file or directory")
    assert "Traceback" not in result.stderr and "compiled" not in result.stderr


def test_a_recovered_restore_prints_its_two_lines_and_nothing_else(tmp_path, capfd, caplog,
                                                                    monkeypatch):
    """The largest data file of the latest checkpoint cut short (the metadata intact): the
    restore falls back to the checkpoint before it, and the failed one's reads of the other
    arrays, still pending when orbax closed its event loop, leave no 'Exception ignored in:
    <coroutine object _read_array_index_and_device_put ...>' with a traceback and the
    TensorStore spec (each collected coroutine printed one before `draining_event_loops`)."""
    import gc

    import jax
    import numpy as np

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    rng = np.random.default_rng(0)
    state = tuple(rng.standard_normal((16, 20_000)).astype(np.float32) for _ in range(6))
    directory = tmp_path / "checkpoints"
    saving = workdir.Checkpoints(str(directory))
    saving.save(1, state, {"iteration": 1})
    saving.save(2, tuple(2 * x for x in state), {"iteration": 2})
    blobs = [os.path.join(folder, name)
             for folder, _, names in os.walk(directory / "2" / "state")
             if os.path.basename(folder) == "d" for name in names]
    largest = max(blobs, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)
    capfd.readouterr()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with caplog.at_level(logging.WARNING):
        restored, host = workdir.Checkpoints(str(directory)).restore(abstract)
    gc.collect()  # Where the pending coroutines were finalized (and printed).
    assert host == {"iteration": 1}
    for got, want in zip(restored, state, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"checkpoint {directory / '2'} cannot be restored",
        f"restored checkpoint {directory / '1'} instead; removed the ones that failed"]
    assert not (directory / "2").exists()
    out, err = capfd.readouterr()
    assert not unraisable, [(u.object, u.exc_value) for u in unraisable]
    for noise in ("Exception ignored", "Traceback", "TensorStore", "Event loop is closed"):
        assert noise not in out + err, out + err


def test_a_checkpoint_from_before_stage_states_restores_into_them(tmp_path):
    """Checkpoints written while DP's state was FLState.privacy restore into FLState.stages."""
    import chex
    import jax
    import jax.numpy as jnp

    from marfl_jax import dp
    from marfl_jax.core import FLState

    params = {"w": jnp.arange(6.0).reshape(3, 2)}
    privacy = dp.PrivacyState(params, {"w": jnp.ones((3, 2))}, jnp.full((3,), 0.5))
    checkpoints = workdir.Checkpoints(str(tmp_path / "checkpoints"))
    checkpoints.save(2, runner.StateBeforeStages(params, (), jnp.ones(3, bool), privacy),
                     {"iteration": 2})
    current = FLState(params, (), jnp.ones(3, bool), {"privacy": privacy})
    abstract = jax.eval_shape(lambda: current)
    state, host = checkpoints.restore(abstract, older=runner.state_before_stages(abstract))
    assert host["iteration"] == 2 and isinstance(state, FLState)
    chex.assert_trees_all_equal(state, current)
    # Without the older layout the same checkpoint does not restore.
    with pytest.raises(ConfigError, match="can be restored"):
        workdir.Checkpoints(str(tmp_path / "checkpoints")).restore(abstract)
