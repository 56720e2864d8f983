"""ONNX Runtime's optimised graphs cached on disk: saved by the first CPU session, loaded by the next, same
outputs; a damaged entry is rebuilt; `CINEMO_RT_ORT_CACHE=off` caches nothing."""

import logging

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

from cinemo_rt.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from cinemo_rt.backends.ort_cache import ENV_VAR, GRAPH  # noqa: E402
from cinemo_rt.graphs import GRAPHS  # noqa: E402

from conftest import ENGINE_SIZE as SIZE  # noqa: E402


def _unet_call(backend):
    g = torch.Generator().manual_seed(5)
    h, w, f = SIZE["height"] // 8, SIZE["width"] // 8, SIZE["frames"]
    return backend.unet(torch.randn(2, 4, f, h, w, generator=g), torch.tensor([501, 501]),
                        torch.randn(2, 77, 32, generator=g), torch.randn(2, 4, 1, h, w, generator=g),
                        torch.tensor([90.0, 90.0]))


def _open(engines):
    backend = OnnxRuntimeBackend(engines, device="cpu")
    return backend, {name: backend.runners[name].cache for name in GRAPHS}


def test_second_session_loads_the_saved_graph_with_the_same_outputs(engines_fp32, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    first, how = _open(engines_fp32)
    assert set(how.values()) == {"saved"}
    saved = sorted((tmp_path / "cache").iterdir())
    assert len(saved) == len(GRAPHS) and all((folder / GRAPH).is_file() for folder in saved)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no scratch left
    second, how = _open(engines_fp32)
    assert set(how.values()) == {"cached"}
    torch.testing.assert_close(_unet_call(second), _unet_call(first), rtol=1e-5, atol=1e-6)


def test_damaged_entry_is_rebuilt(engines_fp32, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    _open(engines_fp32)
    for folder in (tmp_path / "cache").iterdir():
        (folder / GRAPH).write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING):
        backend, how = _open(engines_fp32)
    assert set(how.values()) == {"saved"}
    assert "does not load" in caplog.text
    assert _unet_call(backend).isfinite().all()


def test_off_caches_nothing(engines_fp32, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, how = _open(engines_fp32)
    assert set(how.values()) == {"uncached"}
    assert not any(tmp_path.iterdir())


def test_a_failed_save_still_gives_a_session(engines_fp32, tmp_path, monkeypatch, caplog):
    from cinemo_rt.backends import ort_cache

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    real_scratch = ort_cache._scratch_for

    def vanished(folder, options):  # ORT is told to save into a folder that is gone by then: it raises
        scratch = real_scratch(folder, options)
        scratch.rmdir()
        return scratch

    monkeypatch.setattr(ort_cache, "_scratch_for", vanished)
    with caplog.at_level(logging.WARNING):
        backend, how = _open(engines_fp32)
    assert set(how.values()) == {"uncached"}
    assert "could not save its optimised graph" in caplog.text
    assert _unet_call(backend).isfinite().all()
