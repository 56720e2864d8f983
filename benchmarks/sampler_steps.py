"""How few DPM-Solver++(2M) steps give the same videos as DDIM at 50 steps, on the bundled demo model.

    OMP_NUM_THREADS=1 python benchmarks/sampler_steps.py [--steps 2 3 4 5 10 20] [--ddim-steps 5 10] [--seeds 4]

For every held-out image (benchmarks/controls.py's), seed and prompt of the pair "pan left" / "pan right"
(bucket 12, guidance 7.5, DCTInit on), DDIM at 50 steps and DPM-Solver++(2M) at each step count start from
the same initial noise. Per setting: the mean SSIM of consecutive frames (the motion-intensity measure),
the paired left-minus-right horizontal displacement (the direction measure of controls.py, with its 95%
interval and the share of pairs with the training sign), and the PSNR of each video against DDIM-50's
(both solve the same ODE, so this is how close the solution is). A step count "matches" when its mean SSIM
is within 0.005 of DDIM-50's, its direction mean is inside DDIM-50's 95% interval and its sign agreement
is at least DDIM-50's. DDIM at a few steps is measured the same way, as a control for the criterion.
Writes sampler_steps.json and sampler_steps.md under --out (about 6 minutes on one busy CPU thread).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from controls import held_out_images, mean_shift, paired_difference, psnr  # noqa: E402

from cinemo_rt.motion import mean_consecutive_ssim  # noqa: E402
from cinemo_rt.pipeline import Animator  # noqa: E402
from cinemo_rt.request import Request  # noqa: E402

PAIR = ("pan left", "pan right")  # the training clips for "pan left" move content right: expected sign +1
BUCKET = 12
SSIM_MARGIN = 0.005


def measure(animator: Animator, images: dict, seeds: list[int], sampler: str, steps: int) -> tuple[dict, dict]:
    videos, ssim, dx = {}, [], {p: [] for p in PAIR}
    t0 = time.perf_counter()
    for name, image in images.items():
        for seed in seeds:
            for prompt in PAIR:
                request = Request(prompt, BUCKET, steps=steps, sampler=sampler, seed=seed)
                video = animator.run(image, request)
                videos[(name, seed, prompt)] = video
                ssim.append(mean_consecutive_ssim(video))
                dx[prompt].append(mean_shift(video)[0])
    seconds = time.perf_counter() - t0
    return {"sampler": sampler, "steps": steps, "videos": len(videos),
            "mean_ssim": round(float(np.mean(ssim)), 4),
            "direction": paired_difference(dx[PAIR[0]], dx[PAIR[1]], expected_sign=1.0),
            "seconds_per_video": round(seconds / len(videos), 3)}, videos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "cinemo_rt" / "assets" / "demo"))
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 3, 4, 5, 10, 20])
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[5, 10], help="DDIM controls")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    animator = Animator.from_checkpoint(args.checkpoint, device="cpu")
    images = held_out_images(min(animator.defaults.height, animator.defaults.width))
    seeds = list(range(args.seeds))

    reference, ref_videos = measure(animator, images, seeds, "ddim", 50)
    rows = [reference]
    for sampler, steps in [("dpmpp-2m", n) for n in args.steps] + [("ddim", n) for n in args.ddim_steps]:
        row, videos = measure(animator, images, seeds, sampler, steps)
        row["psnr_vs_ddim50_db"] = round(float(np.mean([psnr(videos[k][1:], ref_videos[k][1:]) for k in videos])), 2)
        ci = reference["direction"]["ci95"]
        row["matches_ddim50"] = bool(abs(row["mean_ssim"] - reference["mean_ssim"]) <= SSIM_MARGIN
                                     and ci[0] <= row["direction"]["mean_px_per_frame"] <= ci[1]
                                     and row["direction"]["sign_agreement"] >= reference["direction"]["sign_agreement"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    fewest = fewest_matching(rows)
    result = {"checkpoint": "cinemo_rt/assets/demo", "images": list(images), "seeds": seeds, "bucket": BUCKET,
              "guidance": Request.guidance, "pair": PAIR, "ssim_margin": SSIM_MARGIN, "rows": rows,
              "fewest_matching_steps": fewest,
              "machine": {"cpu_threads": 1, "torch": torch.__version__, "python": platform.python_version()}}
    out = Path(args.out)
    (out / "sampler_steps.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "sampler_steps.md").write_text(report(result))
    print(report(result))
    return 0


def fewest_matching(rows: list[dict]) -> int | None:
    """The smallest DPM-Solver++(2M) step count from which every larger one measured matches DDIM-50."""
    fewest = None
    for row in sorted((r for r in rows if r["sampler"] == "dpmpp-2m"), key=lambda r: -r["steps"]):
        if not row["matches_ddim50"]:
            break
        fewest = row["steps"]
    return fewest


def report(r: dict) -> str:
    lines = ["# DPM-Solver++(2M) steps against DDIM at 50 (demo checkpoint)", "",
             f"`OMP_NUM_THREADS=1 python benchmarks/sampler_steps.py`: {len(r['images'])} held-out images x "
             f"{len(r['seeds'])} seeds x (\"{r['pair'][0]}\", \"{r['pair'][1]}\"), bucket {r['bucket']}, guidance "
             f"{r['guidance']}, DCTInit on, same initial noise for every sampler; CPU, 1 thread, torch "
             f"{r['machine']['torch']}.", "",
             "| sampler | steps | mean consecutive SSIM | left - right dx (px/frame) [95% CI] | sign agreement | "
             "PSNR vs DDIM-50 (dB) | matches | s/video |", "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        d = row["direction"]
        lines.append(f"| {row['sampler']} | {row['steps']} | {row['mean_ssim']:.4f} | {d['mean_px_per_frame']:+.3f} "
                     f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {d['sign_agreement']:.2f} | "
                     f"{row.get('psnr_vs_ddim50_db', '-')} | {'yes' if row.get('matches_ddim50') else '-'} | "
                     f"{row['seconds_per_video']} |")
    lines += ["", f"A step count matches when its mean SSIM is within {r['ssim_margin']} of DDIM-50's, its direction "
              "mean lies inside DDIM-50's 95% interval and its sign agreement is at least DDIM-50's; DDIM at few "
              "steps is the control. Fewest DPM-Solver++(2M) steps from which every larger count measured matches: "
              f"**{r['fewest_matching_steps']}**. Seconds per video are wall times on a CPU shared with other "
              "work: indicative only.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
