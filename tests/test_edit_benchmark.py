"""benchmarks/editing.py runs end to end on the demo checkpoint (CI runs the script at 1 step; the evidence
in benchmarks/results/editing.md comes from its default settings)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_editing_benchmark_writes_its_report(tmp_path):
    import editing

    assert editing.main(["--reconstruction-steps", "1", "--steps", "1", "--repeats", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "editing.json").read_text())
    assert set(results["reconstruction"]) == {"1"}
    arms = results["transfer"]["all"]
    assert len(arms) == 3 and all(v["n"] == 60 for v in arms.values())  # 5 motions x 4 sources x 3 targets
    assert "5 invert" in results["latency_ms"]["edit"]
    assert (tmp_path / "editing_strip.png").stat().st_size > 0
    assert (tmp_path / "editing.md").read_text().startswith("# Video editing and motion transfer")
