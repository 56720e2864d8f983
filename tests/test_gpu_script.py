"""benchmarks/gpu/run.sh, the one command of a GPU window, tested by its rehearsal: the same steps on
the CPU at tiny sizes, GPU-only steps reporting "skipped: no GPU". On every push, so the window's script runs the
first time. (Its timings are not checked: a rehearsal measures nothing.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
MAX_FILES = 8  # what the window may bring back


def _run(*args: str, out: Path, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _steps(summary: str) -> dict[str, str]:
    rows = [line.split("|")[1:3] for line in summary.splitlines() if line.startswith("| ") and line.count("|") == 4]
    return {name.strip(): status.strip() for name, status in rows if name.strip() != "step"}


@pytest.mark.slow
def test_rehearsal_runs_every_step(tmp_path):
    result = _run("--rehearse", out=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    steps = _steps((tmp_path / "summary.md").read_text())
    assert list(steps) == ["wheels", "environment", "kernel-on-cpu", "latency-fp16", "latency-fast", "latency-fp32",
                           "gpu-tests", "kernel-benchmark", "compile", "kernel-ctest"]
    assert steps["kernel-ctest"] == steps["kernel-benchmark"] == "skipped: no GPU"
    for name in ("environment", "kernel-on-cpu", "latency-fp16", "latency-fast", "latency-fp32", "gpu-tests"):
        assert steps[name] == "ok", steps
    assert steps["wheels"] == "ok" or steps["wheels"].startswith("skipped: no .whl/ carried"), steps
    assert steps["compile"] == "ok" or "left, the step needs" in steps["compile"], steps
    # The summary is the last thing printed, and the latency table made it in.
    assert result.stdout.rstrip().endswith((tmp_path / "summary.md").read_text().rstrip())
    assert "| torch-fast | float32 |" in result.stdout and "| torch-fp16 | float16 |" in result.stdout
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES, files
    assert all(len(p.relative_to(tmp_path).parts) <= 2 for p in files), files
    log = (tmp_path / "steps.log").read_text()
    assert "nvidia-smi: not found" in log and "av was imported" not in log
    # The three latency steps merged into one report; every stage of every backend reported, DCTInit (the edit's
    # too) through the CUDA kernel executed on the CPU, behind the kernels' precondition checks.
    report = json.loads((tmp_path / "latency-tiny-cpu.json").read_text())
    assert list(report["backends"]) == ["torch-fp16", "torch-fast", "torch-fp32"]
    for name, backend in report["backends"].items():
        assert all(v["status"] == "ok" for v in backend["stages"].values()), (name, backend["stages"])
    assert set(report["parity_rel_l2_vs_torch_fp32"]) == {"torch-fp16", "torch-fast"}
    assert "DCTInit: the CUDA kernel executed on the CPU" in log
    assert "dct.cu on the CPU at (1, 4, 16, 40, 64): all within tolerance" in log


def test_window_without_a_gpu_points_at_the_rehearsal(tmp_path):
    result = _run(out=tmp_path, timeout=120)
    if result.returncode == 0:
        pytest.skip("a CUDA GPU is visible: the window itself is run by hand (benchmarks/gpu/README.md)")
    assert result.returncode == 2 and "--rehearse" in result.stderr
    assert not any(tmp_path.iterdir())
