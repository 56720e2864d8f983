"""ONNX Runtime's optimised graphs, kept on disk between processes.

Creating a CPU session optimises the graph first (constant folding, fusions, re-laying-out convolution
weights for its blocked kernels): most of the 8 s the full-width UNet's session takes on one core of a 2-core
CPU before its first call, 1.4 s once cached (benchmarks/results/ort_session.md). The optimised graph depends on the graph, the
onnxruntime version and the CPU, so it is saved once per (graph SHA-256, onnxruntime version, CPU) and later
sessions load it with no optimisation of their own. CPU provider only: the CUDA provider's sessions are
created once per server process and their cost is elsewhere (cuDNN autotuning).

`CINEMO_RT_ORT_CACHE`: the cache folder (default `$XDG_CACHE_HOME/cinemo-rt/ort`, or `~/.cache/...`), or
`off`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

ENV_VAR = "CINEMO_RT_ORT_CACHE"
GRAPH = "graph.onnx"
STALE_SCRATCH_S = 24 * 3600  # a save takes seconds to minutes; a day-old scratch folder is abandoned


def cache_root() -> Path | None:
    value = os.environ.get(ENV_VAR, "")
    if value.lower() == "off":
        return None
    if value:
        return Path(value)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cinemo-rt" / "ort"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def cache_folder(graph_sha256: str, providers: list) -> Path | None:
    """Where the optimised form of the graph with this SHA-256 lives, or None when not cached."""
    import onnxruntime as ort

    root = cache_root()
    if root is None or providers != ["CPUExecutionProvider"]:
        return None
    key = "|".join((graph_sha256, ort.__version__, platform.machine(), _cpu_name()))
    return root / hashlib.sha256(key.encode()).hexdigest()[:32]


def create_session(path: Path, graph_sha256: str | None, providers: list, make_options: Callable):
    """An InferenceSession of `path`; from the cached optimised graph when there is one, else saving it.
    Returns (session, how) with how "cached", "saved" or "uncached"."""
    import onnxruntime as ort

    folder = cache_folder(graph_sha256, providers) if graph_sha256 else None
    if folder is not None and (folder / GRAPH).is_file():
        options = make_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done when saved
        try:
            return ort.InferenceSession(str(folder / GRAPH), sess_options=options, providers=providers), "cached"
        except Exception as err:  # a damaged or foreign cache entry: drop it and optimise again
            log.warning("ONNX Runtime cache %s does not load (%s); rebuilding it", folder, type(err).__name__)
            shutil.rmtree(folder, ignore_errors=True)
    options = make_options()
    scratch = _scratch_for(folder, options) if folder is not None else None
    if scratch is None:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers), "uncached"
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # saving the optimised graph failed (disk full, ...): a session without the cache
        shutil.rmtree(scratch, ignore_errors=True)
        log.warning("ONNX Runtime could not save its optimised graph to %s (%s); not caching", folder,
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
        return ort.InferenceSession(str(path), sess_options=make_options(), providers=providers), "uncached"
    try:
        os.replace(scratch, folder)  # whole folder at once: a reader never sees half a graph
        log.info("saved ONNX Runtime's optimised %s to %s", path.name, folder)
        return session, "saved"
    except OSError:  # another process saved it first, or the disk filled
        shutil.rmtree(scratch, ignore_errors=True)
        return session, "uncached"


def _scratch_for(folder: Path, options) -> Path | None:
    """A scratch folder next to `folder` that ORT writes the optimised graph (and its weights) into."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(".*"):  # scratch of a process killed while saving
            if time.time() - stale.stat().st_mtime > STALE_SCRATCH_S:
                shutil.rmtree(stale, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    except OSError as err:
        log.warning("ONNX Runtime cache folder %s is not writable (%s); not caching", folder.parent, err)
        return None
    options.optimized_model_filepath = str(scratch / GRAPH)
    # Weights beside the graph: a full-width UNet is over protobuf's 2 GB limit.
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", GRAPH + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return scratch
