"""Shared fixtures: one tiny checkpoint folder per test session (written once, seconds on a CPU)."""

import logging

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory):
    from cinemo_rt.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(autouse=True)
def _quiet_and_deterministic():
    torch.manual_seed(0)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    yield

