"""Start-up of the demo run: `cinemo-rt -v run` on the bundled demo against `python -c "import torch"`.

    python benchmarks/startup.py                       # this tree, 5 interleaved rounds
    python benchmarks/startup.py --before e1fe71a      # and the package as of that git revision, same rounds

Each round runs, in turn, `import torch` and the README's quick-start command for every tree (each tree's
`cinemo_rt/` copied to a temporary folder, so no other checkout or installed copy is imported). Reported per
command: wall seconds and CPU seconds (user + system of the child), medians over the rounds, and the phases
the run logs with `-v` (validate, imports, model load, stages, write). The goal is the demo run within 3x
the wall time of `import torch` on the same machine. Results: benchmarks/results/startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
DEMO_ARGS = ["run", "--image", str(ROOT / "cinemo_rt" / "assets" / "example.png"), "--prompt",
             "the camera pans left", "--bucket", "15", "--seed", "0"]
PHASE = re.compile(r"([a-z][a-z0-9 +]*?) (\d+\.\d+) s")


def tree_copy(rev: str | None, dest: Path) -> Path:
    """`cinemo_rt/` of git revision `rev` (None: this working tree) under `dest`."""
    dest.mkdir(parents=True)
    if rev is None:
        shutil.copytree(ROOT / "cinemo_rt", dest / "cinemo_rt", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "cinemo_rt"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds of one child process, and its stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stderr


def phases_of(log: str) -> dict[str, float]:
    """The phases a `-v` run logs: its 'start-up:' line, the stage lines, and 'write:'."""
    out: dict[str, float] = {}
    for line in log.splitlines():
        if "start-up:" in line:
            out.update({name.strip(): float(s) for name, s in PHASE.findall(line.split("start-up:", 1)[1])})
        elif m := re.search(r"cinemo_rt:\s+(\d \w[\w ]*?|total)\s+(\d+\.\d+) s$", line):
            stage = m.group(1).strip()
            out["stages total" if stage == "total" else stage] = float(m.group(2))
        elif m := re.search(r"write: (\d+\.\d+) s", line):
            out["write"] = float(m.group(1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", metavar="REV", help="also the package as of this git revision")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    python = sys.executable
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        trees = {"after": tree_copy(None, scratch / "after")}
        if args.before:
            trees = {"before": tree_copy(args.before, scratch / "before"), **trees}
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        commands = {"import torch": ([python, "-c", "import torch"], trees["after"])}
        for name, tree in trees.items():
            out = scratch / f"demo-{name}.mp4"
            commands[f"demo run ({name})"] = ([python, "-m", "cinemo_rt.cli", "-v", *DEMO_ARGS, "--out", str(out),
                                               "--overwrite"], tree)
        runs: dict[str, list[dict]] = {name: [] for name in commands}
        for round_ in range(args.rounds + 1):  # round 0 warms the file cache, not counted
            for name, (cmd, tree) in commands.items():
                wall, cpu, log = timed(cmd, {**env, "PYTHONPATH": str(tree)}, scratch)
                if round_:
                    runs[name].append({"wall_s": wall, "cpu_s": cpu, "phases": phases_of(log)})
            print(f"round {round_}/{args.rounds}: " + ", ".join(
                f"{n} {r[-1]['wall_s']:.2f} s" for n, r in runs.items() if r), file=sys.stderr)
    summary = {}
    torch_wall = median(r["wall_s"] for r in runs["import torch"])
    torch_cpu = median(r["cpu_s"] for r in runs["import torch"])  # the goal is wall time; CPU shows the load's share
    for name, rs in runs.items():
        phase_names = dict.fromkeys(k for r in rs for k in r["phases"])
        summary[name] = {"wall_s": round(median(r["wall_s"] for r in rs), 2),
                         "cpu_s": round(median(r["cpu_s"] for r in rs), 2),
                         "x_import_torch_wall": round(median(r["wall_s"] for r in rs) / torch_wall, 2),
                         "x_import_torch_cpu": round(median(r["cpu_s"] for r in rs) / torch_cpu, 2),
                         "phases_s": {k: round(median(r["phases"].get(k, 0.0) for r in rs), 3) for k in phase_names}}
    report = {"command": "python benchmarks/startup.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "demo_args": DEMO_ARGS[:1] + DEMO_ARGS[3:],
              "environment": {"python": platform.python_version(), "cores": os.cpu_count(),
                              "load_average_end": os.getloadavg()},
              "rounds": args.rounds, "before": args.before, "summary": summary, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Demo start-up: `cinemo-rt run` against `import torch`", "",
             f"Command: `{report['command']}`  ", f"Date: {report['created']}, Python {platform.python_version()}, "
             f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end (shared machine)  ",
             f"Medians of {args.rounds} interleaved rounds. CPU = user + system seconds of the process.", "",
             "| command | wall s | CPU s | wall / import torch | CPU / import torch |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['wall_s']:.2f} | {s['cpu_s']:.2f} | {s['x_import_torch_wall']:.2f}x "
                     f"| {s['x_import_torch_cpu']:.2f}x |")
    for name, s in summary.items():
        if s["phases_s"]:
            lines += ["", f"Phases of {name} (seconds, as `-v` logs them):", "",
                      ", ".join(f"{k} {v:g}" for k, v in s["phases_s"].items())]
    (args.out / "startup.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'startup.json'} and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
