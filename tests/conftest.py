"""Shared fixtures: one tiny checkpoint folder per test session (written once, seconds on a CPU)."""

import logging

import pytest
import torch

from cinemo_rt.threads import apply_threads

# Every test model is tiny: the thread policy gives them 1 thread (CINEMO_RT_THREADS overrides). torch's default
# of one per core made the suite 34 min instead of about 5 beside other work on a 2-core machine.
apply_threads(parameters=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory):
    from cinemo_rt.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(autouse=True)
def _quiet_and_deterministic():
    torch.manual_seed(0)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    yield



# -- engines folders built from the tiny checkpoint, shared by the export, ORT and TensorRT tests -------
ENGINE_SIZE = dict(height=64, width=64, frames=15)  # the released frame count at a tiny spatial size


def build_tiny_engines(ckpt, out, precision, **kw):
    from pathlib import Path

    from export.build_engines import BuildOptions, build

    return build(BuildOptions(checkpoint=Path(ckpt), out=Path(out), precision=precision, **ENGINE_SIZE, **kw))


def _session_engines(tiny_checkpoint_dir, tmp_path_factory, precision):
    pytest.importorskip("onnx_graphsurgeon")
    out = tmp_path_factory.getbasetemp() / "engines" / precision
    build_tiny_engines(tiny_checkpoint_dir, out, precision)
    return out


@pytest.fixture(scope="session")
def engines_fp32(tiny_checkpoint_dir, tmp_path_factory):
    return _session_engines(tiny_checkpoint_dir, tmp_path_factory, "fp32")


@pytest.fixture(scope="session")
def engines_fp16(tiny_checkpoint_dir, tmp_path_factory):
    return _session_engines(tiny_checkpoint_dir, tmp_path_factory, "fp16")


@pytest.fixture(scope="session", autouse=True)
def _ort_cache_in_tmp(tmp_path_factory):
    """ONNX Runtime's optimised-graph cache (cinemo_rt/backends/ort_cache.py) in the session's temp folder, not
    the user's ~/.cache; subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CINEMO_RT_ORT_CACHE", str(tmp_path_factory.mktemp("ort-cache")))
        yield
