"""Two processes on localhost (jax.distributed over CPU, gloo collectives) run one simulation
together and agree with the single-process run."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from marfl_jax import runner
from marfl_jax.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=2, batch_size=8,
                eval_every=1, eval_peers="all", max_iterations=3, target_accuracy=1.0,
                checkpoint_every=2, dropout=0.3, dp=True, dp_noise_multiplier=0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _flags(config: Config) -> list[str]:
    skip = {"workdir", "data_dir", "conv_impl", "features", "feature_cache"}
    return [f"--{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
            if f.name not in skip]


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    single = runner.run(CONFIG, str(tmp_path / "single")).metrics
    address = f"localhost:{_free_port()}"
    workdir = tmp_path / "two"
    processes = [subprocess.Popen(
        [sys.executable, "-m", "launch.train", *_flags(CONFIG), f"--workdir={workdir}",
         f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu")) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "sharded over 2 devices" in outputs[0]
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == len(single) == CONFIG.max_iterations
    for a, b in zip(single, rows, strict=True):
        assert (a["bytes"], a["present_peers"]) == (b["bytes"], b["present_peers"])
        np.testing.assert_allclose([a["loss"], a["accuracy"], a["epsilon_rdp"]],
                                   [b["loss"], b["accuracy"], b["epsilon_rdp"]],
                                   rtol=1e-4, atol=1e-4)
