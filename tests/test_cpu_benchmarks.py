"""benchmarks/cpu_paths.py and benchmarks/startup.py: the scripts run and report what they say (CI runs them,
not their timings; the measured figures are in benchmarks/results/)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import startup  # noqa: E402


@pytest.mark.slow
def test_cpu_paths_tiny_runs_every_path_side_by_side(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("needs the git checkout (--before reads the model of a revision); runs in CI's clone")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_paths.py"), "--no-full", "--no-onnx",
                             "--tiny-repeats", "1", "--before", "HEAD", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "cpu_paths.json").read_text())
    (size, r), = report["models"]["tiny (demo config)"].items()
    assert set(r["paths"]) == {"eager (before)", "eager", "torch-fast (contiguous)", "torch-fast (channels_last)"}
    for name, path in r["paths"].items():
        assert path["median_cpu_s"] > 0 and path["ms_per_op"], name
        assert name == "eager" or path["rel_l2_vs_eager"] < 1e-5, (name, path["rel_l2_vs_eager"])
    assert "torch-fast (contiguous)" in (tmp_path / "cpu_paths.md").read_text()


def test_startup_reads_the_phases_a_verbose_run_logs():
    log = "\n".join([
        "DEBUG cinemo_rt: start-up: validate 0.08 s, import torch 1.93 s, import libraries 3.10 s, load model 0.40 s",
        "INFO cinemo_rt:   5 denoise             1.234 s",
        "INFO cinemo_rt:   total                 1.500 s",
        "DEBUG cinemo_rt: write: 0.12 s",
    ])
    assert startup.phases_of(log) == {"validate": 0.08, "import torch": 1.93, "import libraries": 3.10,
                                      "load model": 0.40, "5 denoise": 1.234, "stages total": 1.5, "write": 0.12}


def test_unet_flops_counts_from_the_shapes():
    """The work of a call, counted on the meta device (nothing computed): convolutions scale with the map
    exactly, linear layers a little less (the text's keys and values do not)."""
    import unet_flops

    from cinemo_rt.model import full_config

    small, large = (unet_flops.count_flops(full_config(), size) for size in (8, 16))
    assert large["convolution"] == pytest.approx(4 * small["convolution"])
    assert 3.5 * small["linear"] < large["linear"] < 4 * small["linear"]
    assert 200 < small["convolution"] < 250  # GFLOP of the released UNet at 8x8 latents, CFG batch 2, 16 frames


@pytest.mark.slow
def test_ort_session_times_the_three_ways_a_session_is_made(tmp_path):
    """benchmarks/ort_session.py on the demo's UNet config: uncached, saved into the cache, then from it."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ort_session.py"), "--tiny", "--rounds", "1",
                             "--work", str(tmp_path / "work"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "ort_session.json").read_text())["rows"]
    assert [runs[0]["how"] for runs in rows.values()] == ["uncached", "saved", "cached"]
    assert all(runs[0]["create_s"] > 0 and runs[0]["first_call_s"] > 0 for runs in rows.values())
