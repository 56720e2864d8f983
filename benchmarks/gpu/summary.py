"""The summary table of a GPU window (benchmarks/gpu/run.sh prints it last and keeps it as summary.md).

    python benchmarks/gpu/summary.py STEPS_TSV OUT_DIR

STEPS_TSV: one line per step, `name<TAB>status<TAB>seconds`. OUT_DIR: the window's $OUT, where latency.py wrote
latency-<device>.json (and compile/latency-<device>.json). Prints the Markdown and writes OUT_DIR/summary.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The project's targets for the full job (16x320x512, 50 DDIM steps, CFG) on an H100/H200.
TARGET_E2E_MS = 1500.0
TARGET_SPEEDUP = 4.0


def read_steps(path: Path) -> list[tuple[str, str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, status, seconds = (line.split("\t") + ["", ""])[:3]
            rows.append((name, status, seconds))
    return rows


def cell(stats: dict | None, digits: int = 1) -> str:
    """A stage's warm median in ms, or why there is none: - (not run), FAILED, not finished."""
    if stats is None:
        return "-"
    if stats.get("status", "ok") != "ok":
        return "FAILED" if stats["status"] == "failed" else stats["status"]
    return f"{stats['median_ms']:.{digits}f}"


COLUMNS = ("first video (cold) | end to end | end to end --fast | denoise loop | UNet call | UNet TFLOP/s | "
           "vs torch-fp16 | parity x_0")


def latency_rows(report: dict) -> list[str]:
    rows = []
    parity = report.get("parity_rel_l2_vs_torch_fp32", {})
    for name, r in report["backends"].items():
        stages = r["stages"]
        speedup = report["speedup_vs_torch_fp16"].get(name)
        fast = cell(stages.get("end_to_end_fast"))
        if stages.get("end_to_end_fast", {}).get("status") == "ok":
            fast += f" ({r.get('fast_unet_calls', '?')} calls)"
        x_0 = parity.get(name, {}).get("x_0")
        rows.append(f"| {name} | {r['dtype']} | {cell(stages.get('cold_first_video'))} | "
                    f"{cell(stages.get('end_to_end'))} | {fast} | {cell(stages.get('denoise_loop'))} | "
                    f"{cell(stages.get('unet_call'), 2)} | "
                    + ("-" if "unet_tflops" not in r else f"{r['unet_tflops']:.3g}") + " | "
                    + ("-" if speedup is None else f"{speedup:.2f}x") + " | "
                    + ("reference" if name == "torch-fp32" else "-" if x_0 is None else f"{x_0:.2e}") + " |")
        rows += [f"| {name} | {stage}: {v['status']}: {v['reason']} |||||||||" for stage, v in stages.items()
                 if v.get("status", "ok") != "ok"]
    for kind in ("failed", "skipped"):
        for name, reason in report.get(kind, {}).items():
            rows.append(f"| {name} | {kind}: {reason} |||||||||")
    return rows


def targets(report: dict) -> list[str]:
    """The two targets, judged on torch-fast of this run (full size on a GPU only)."""
    fast = report["backends"].get("torch-fast")
    e2e = (fast or {}).get("stages", {}).get("end_to_end", {})
    if report["job"].get("tiny") or e2e.get("status") != "ok":
        return ["Targets (full size on a GPU, torch-fast end to end): not judged in this run."]
    e2e = e2e["median_ms"]
    speedup = report["speedup_vs_torch_fp16"].get("torch-fast")
    lines = [f"- end to end {e2e:.0f} ms, target <= {TARGET_E2E_MS:.0f} ms: "
             + ("met" if e2e <= TARGET_E2E_MS else "NOT met")]
    if speedup is not None:
        lines.append(f"- {speedup:.2f}x the fp16 eager reference, target >= {TARGET_SPEEDUP:.0f}x: "
                     + ("met" if speedup >= TARGET_SPEEDUP else "NOT met"))
    return lines


def summary(steps: list[tuple[str, str, str]], out: Path) -> str:
    lines = ["# GPU window summary", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {seconds} |" for name, status, seconds in steps]
    for title, folder in (("Latency", out), ("torch.compile", out / "compile")):
        for path in sorted(folder.glob("latency-*.json")):
            report = json.loads(path.read_text())
            job = report["job"]
            lines += ["", f"## {title}: {report['environment']['device']} ({path.relative_to(out)})", "",
                      f"{job['frames'] + 1} frames at {job['height']}x{job['width']}, {job['steps']} steps, CFG; "
                      "ms: the first video of a fresh backend (one-off costs included) once, then warm medians; "
                      "parity = relative L2 of x_0 against torch-fp32; `-` not run (the fp32 reference runs one "
                      "UNet call and one loop)", "",
                      f"| backend | dtype | {COLUMNS} |", "|---|---|" + "---|" * COLUMNS.count("|") + "---|",
                      *latency_rows(report), "",
                      "Consistency: " + ("; ".join(report.get("consistency", [])) or "ok"), "", *targets(report)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    steps_tsv, out = Path(args[0]), Path(args[1])
    text = summary(read_steps(steps_tsv), out)
    tmp = out / ".summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "summary.md")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
