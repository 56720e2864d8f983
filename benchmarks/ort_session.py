"""ONNX Runtime's session creation for the full-width UNet on the CPU: without the cache, the first time (the
graph optimised and saved), and from the cache (`cinemo_rt/backends/ort_cache.py`).

    python benchmarks/ort_session.py --work /tmp/ort_work           # exports the UNet once (about 7 min here)
    python benchmarks/ort_session.py --work /tmp/ort_work --rounds 3
    python benchmarks/ort_session.py --work /tmp/ort_tiny --tiny   # the demo's config: seconds (CI runs this)

Each creation runs in a fresh process (nothing warm from the one before), on 1 thread, through the runtime's
own `create_session`, and is followed by one UNet call at 8x8 latents (CFG batch 2, 16 frames) so that work
ONNX Runtime defers to the first call counts too. Results: benchmarks/results/ort_session.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
SIZE = 8  # latents: the session does not depend on them (dynamic axes), the first call's time does

CHILD = """
import json, sys, time
start = time.perf_counter()
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from cinemo_rt.backends.onnxruntime_backend import session_options
from cinemo_rt.backends.ort_cache import create_session
imported = time.perf_counter()
session, how = create_session(Path(sys.argv[1]), sys.argv[2], ["CPUExecutionProvider"], session_options)
created = time.perf_counter()
size = int(sys.argv[4])
g = torch.Generator().manual_seed(0)
feeds = dict(zip([i.name for i in session.get_inputs()], [a.numpy() for a in (
    torch.randn(2, 4, 15, size, size, generator=g), torch.full((2,), 500), torch.randn(2, 77, int(sys.argv[5]), generator=g),
    torch.randn(2, 4, 1, size, size, generator=g), torch.full((2,), 90.0))]))
session.run(None, feeds)
called = time.perf_counter()
print(json.dumps({"how": how, "create_s": created - imported, "first_call_s": called - created}))
"""


def graph_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**24), b""):
            digest.update(block)
    return digest.hexdigest()


def create_in_a_fresh_process(path: Path, sha: str, cache: str, text_dim: int) -> dict:
    env = {**os.environ, "CINEMO_RT_ORT_CACHE": cache, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), sha, str(ROOT), str(SIZE), str(text_dim)],
                            env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="the exported full-width UNet is kept here and reused")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the demo's UNet config instead of the full width")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import cpu_paths
    from cinemo_rt.model import UNet3D, full_config

    torch.set_num_threads(1)
    work = Path(args.work)
    path = work / "unet.onnx"
    config = UNet3D.from_config(cpu_paths.TINY).config if args.tiny else full_config()
    if not path.is_file():
        with torch.device("meta"):
            unet = UNet3D(config)
        unet = unet.to_empty(device="cpu").eval()
        for parameter in unet.parameters():
            torch.nn.init.normal_(parameter, std=0.02)
        cpu_paths.onnx_unet(unet, SIZE, work)
        del unet
    sha = graph_sha256(path)
    load_start = os.getloadavg()[0]
    rows = {"uncached (cache off)": [], "first (optimised and saved)": [], "cached": []}
    for round_ in range(args.rounds):
        cache = Path(tempfile.mkdtemp(prefix="ort-cache-"))
        try:
            rows["uncached (cache off)"].append(create_in_a_fresh_process(path, sha, "off", config.cross_attention_dim))
            rows["first (optimised and saved)"].append(create_in_a_fresh_process(path, sha, str(cache),
                                                                                 config.cross_attention_dim))
            rows["cached"].append(create_in_a_fresh_process(path, sha, str(cache), config.cross_attention_dim))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
            f"{name} {r[-1]['create_s']:.1f} s + first call {r[-1]['first_call_s']:.1f} s" for name, r in rows.items()),
            flush=True)
    import onnxruntime

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "cores": os.cpu_count(),
            "load_average": [round(load_start, 1), round(os.getloadavg()[0], 1)], "rounds": args.rounds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ort_session.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# ONNX Runtime session creation, {'demo-config' if args.tiny else 'full-width'} UNet, CPU, 1 thread",
             "", f"Command: `python benchmarks/ort_session.py --work DIR --rounds {args.rounds}"
             f"{' --tiny' if args.tiny else ''}`  ",
             f"Date: {meta['date']}; onnxruntime {meta['onnxruntime']}, torch {meta['torch']}, Python "
             f"{meta['python']}, {meta['cores']} cores; load average {meta['load_average'][0]} at the start, "
             f"{meta['load_average'][1]} at the end (shared machine). Each creation in a fresh process; medians.",
             "", "| session | how | creation s | first 8x8 call s | creation + first call s |", "|---|---|---|---|---|"]
    for name, runs in rows.items():
        create, first = median(r["create_s"] for r in runs), median(r["first_call_s"] for r in runs)
        lines.append(f"| {name} | {runs[0]['how']} | {create:.1f} | {first:.1f} | {create + first:.1f} |")
    (out / "ort_session.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'ort_session.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
