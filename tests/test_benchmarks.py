"""benchmarks/latency.py --tiny smoke test (CI runs the script, not its timings) and the UNet FLOP count."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import flops  # noqa: E402
import latency  # noqa: E402

# One CFG call (batch 2, 16 frames, 40x64 latents) is 16.2 TFLOP: conv 8.9, linear 5.7, attention 1.6.
ISSUE_TFLOP = {"total": 16.2, "conv": 8.9, "linear": 5.7, "attention": 1.6}


def test_full_size_unet_flops_on_meta_device():
    counted = flops.count_unet_flops(batch=2, frames=15, latent_h=40, latent_w=64).as_dict()
    for family, expected in ISSUE_TFLOP.items():
        assert counted[family] / 1e12 == pytest.approx(expected, rel=0.03), (family, counted[family])
    assert counted["other"] == 0


def test_latency_tiny_writes_every_stage(tmp_path):
    code = latency.main(["--tiny", "--steps", "1", "--repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "latency-tiny-cpu.json").read_text())
    text = (tmp_path / "latency-tiny-cpu.md").read_text()
    assert text.startswith("# Cinemo latency") and all(f"`{s}`: " in text for s in latency.STAGES)  # the legend
    assert report["command"].startswith("python benchmarks/latency.py --tiny")
    assert report["matmul_ceiling"]["tflops"] > 0 and report["unet_flops"]["total"] > 0
    # the order of value: the optimised path first, the fp32 reference last and reduced to what parity needs
    assert list(report["backends"]) == ["torch-fast", "torch-fp32"], report["skipped"]
    for name, result in report["backends"].items():
        wanted = latency.REFERENCE_STAGES if name == "torch-fp32" else latency.STAGES
        assert list(result["stages"]) == list(wanted), name
        for stage in wanted:
            stats = result["stages"][stage]
            assert stats["status"] == "ok", (name, stage, stats)
            assert stats["median_ms"] > 0 and stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"], (name, stage)
        assert result["unet_tflops"] > 0
    assert report["backends"]["torch-fast"]["stages"]["cold_first_video"]["n"] == 1
    assert report["backends"]["torch-fast"]["profile"]["ms"]["conv"] > 0
    assert "consistency" in report  # the check ran (its verdict is a timing: not asserted)
    parity = report["parity_rel_l2_vs_torch_fp32"]["torch-fast"]
    assert parity["eps"] < 1e-5 and parity["x_0"] < 1e-5


def test_latency_a_failing_stage_is_recorded_and_the_rest_still_report(tmp_path, monkeypatch):
    """The edit stage raising (as the kernel's contract once made it on a GPU) loses nothing else."""
    real = latency.stage_fns

    def failing_edit(*args, **kw):
        fns, parity = real(*args, **kw)

        def edit():
            raise ValueError("noise is not contiguous")

        return {**fns, "edit": edit}, parity

    monkeypatch.setattr(latency, "stage_fns", failing_edit)
    code = latency.main(["--tiny", "--steps", "1", "--repeats", "1", "--no-profile", "--out", str(tmp_path)])
    assert code == latency.EXIT_BACKEND_FAILED
    report = json.loads((tmp_path / "latency-tiny-cpu.json").read_text())
    stages = report["backends"]["torch-fast"]["stages"]
    assert stages["edit"] == {"status": "failed", "reason": "ValueError: noise is not contiguous", "long": True}
    assert all(v["status"] == "ok" for k, v in stages.items() if k != "edit")
    assert "torch-fast" in report["parity_rel_l2_vs_torch_fp32"]
    assert "torch-fast `edit`: failed: ValueError" in (tmp_path / "latency-tiny-cpu.md").read_text()


def test_latency_budget_reports_not_finished_and_merges_runs(tmp_path):
    """A spent budget: stages not started are "not finished" (exit 0); a second run merges into the report and
    parity spans both runs through --outputs."""
    outputs = tmp_path / "outputs"
    base = ["--tiny", "--steps", "1", "--repeats", "1", "--no-profile", "--out", str(tmp_path), "--outputs",
            str(outputs), "--merge"]
    assert latency.main(base + ["--backends", "torch-fast", "--budget-s", "0"]) == 0
    report = json.loads((tmp_path / "latency-tiny-cpu.json").read_text())
    assert {v["status"] for v in report["backends"]["torch-fast"]["stages"].values()} == {"not finished"}
    assert latency.main(base + ["--backends", "torch-fp32"]) == 0
    report = json.loads((tmp_path / "latency-tiny-cpu.json").read_text())
    assert list(report["backends"]) == ["torch-fast", "torch-fp32"]
    assert report["parity_rel_l2_vs_torch_fp32"]["torch-fast"]["eps"] < 1e-5  # outputs from the first run
    assert "not finished" in (tmp_path / "latency-tiny-cpu.md").read_text()


def test_latency_refuses_a_cold_median():
    with pytest.raises(SystemExit):
        latency.parse_args(["--tiny", "--warmup", "0"])
    args = latency.parse_args(["--tiny", "--cfg-stages-only", "--backends", "torch-fp32", "torch-fast"])
    assert "edit" not in args.stages and "end_to_end_fast" not in args.stages and "unet_call" in args.stages
    assert args.backends == ["torch-fast", "torch-fp32"]


def test_full_size_without_gpu_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(latency.torch.cuda, "is_available", lambda: False)
    assert latency.main([]) == latency.EXIT_NO_GPU
    assert "--tiny" in capsys.readouterr().err


def test_controls_direction_measure_has_the_training_sign():
    """benchmarks/controls.py measures direction by phase correlation: a rendered "pan left" clip (content
    moves right) must read as +x, "pan down" as -y, and the paired statistics must count signs correctly."""
    import numpy as np

    import controls
    from cinemo_rt.demo_data import drawn_scene, render_clip

    image = controls.fit(drawn_scene(np.random.default_rng(5)), 32)
    left = controls.mean_shift(render_clip(image, "pan_left", 0.03, 9, 32, np.random.default_rng(0)))
    right = controls.mean_shift(render_clip(image, "pan_right", 0.03, 9, 32, np.random.default_rng(0)))
    down = controls.mean_shift(render_clip(image, "pan_down", 0.03, 9, 32, np.random.default_rng(0)))
    assert left[0] > 0.3 and right[0] < -0.3 and abs(left[1]) < 0.15, (left, right)
    assert down[1] < -0.3 and abs(down[0]) < 0.15, down

    stats = controls.paired_difference([1.0, 0.5, -0.1, 0.4], [0.0, 0.1, 0.0, 0.3], expected_sign=1)
    assert stats["mean_px_per_frame"] == pytest.approx(0.35)
    assert stats["sign_agreement"] == pytest.approx(0.75) and stats["n"] == 4
    assert stats["ci95"][0] < 0.35 < stats["ci95"][1]


def test_latency_exits_nonzero_when_a_backend_fails(tmp_path, monkeypatch):
    """A backend that raises while measured is a failure (exit 1, FAILED in the table), not a silent skip; a
    named backend that is unavailable (no --engines) is one too."""
    real = latency.run_backend

    def failing(name, *args, **kw):
        if name == "torch-fast":
            raise RuntimeError("z1 is on cpu")
        return real(name, *args, **kw)

    monkeypatch.setattr(latency, "run_backend", failing)
    base = ["--tiny", "--steps", "1", "--repeats", "1", "--no-profile", "--out", str(tmp_path)]
    assert latency.main(base) == latency.EXIT_BACKEND_FAILED
    report = json.loads((tmp_path / "latency-tiny-cpu.json").read_text())
    assert set(report["backends"]) == {"torch-fp32"} and "z1 is on cpu" in report["failed"]["torch-fast"]
    assert "FAILED: RuntimeError: z1 is on cpu" in (tmp_path / "latency-tiny-cpu.md").read_text()
    assert latency.main(base + ["--backends", "onnxruntime"]) == latency.EXIT_BACKEND_FAILED
    report = json.loads((tmp_path / "latency-tiny-cpu.json").read_text())
    assert "no --engines" in report["failed"]["onnxruntime"] and not report["skipped"]
