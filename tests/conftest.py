"""Shared test settings: tests run on the CPU with float32 and never touch the network."""

import os

os.environ.setdefault("MARFL_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
