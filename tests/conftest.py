"""Test-wide setup: Triton runs in its interpreter without CUDA, and GPU-only tests are skipped."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The example task (examples/arithmetic) is part of the checkout, not of the installed package.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Must happen before anything imports triton: the interpreter is chosen at import time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores, several processes per test in the distributed tests: keep torch from oversubscribing.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A tiny random Qwen3 Hugging Face checkpoint directory, one per test module."""
    from uniopd_mcore.learner.testing import make_tiny_hf_model

    path = str(tmp_path_factory.mktemp("tiny_qwen3"))
    make_tiny_hf_model(path)
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped on CPU-only machines")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU-only check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
