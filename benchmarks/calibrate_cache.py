"""Fit the step cache's indicator polynomial to a checkpoint and store it in its cinemo_rt.json.

    python benchmarks/calibrate_cache.py --checkpoint cinemo_rt/assets/demo [--write]

Runs full sampling (no cache) on calibration images, the training photos of the demo data set (the held-out
ones stay for benchmarks/fewer_calls.py), at several step counts, and records per step the relative L1 change
of the model input x_t and of the guided model output since the previous step (the last step, always
computed, is left out). A polynomial of the input change fitted to the output change (least squares) is
TeaCache's rescaling: `StepCache` accumulates it as the estimated output change. With --write it is merged
into `<checkpoint>/cinemo_rt.json` under "step_cache" (other keys kept).

Re-calibrating on the real weights: run this with --checkpoint on the released folder (or an engines folder
built from it, --engines) and images like the ones you animate, then rerun benchmarks/fewer_calls.py and pick
the threshold from its Pareto front: the real 320x512x16 model may change its output at another pace.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cinemo_rt.demo_data import TRAIN_PHOTOS, photo  # noqa: E402
from cinemo_rt.fewer_calls import relative_l1, store_calibration  # noqa: E402
from cinemo_rt.pipeline import Animator  # noqa: E402

from controls import fit  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

PROMPTS = ("pan left", "zoom in")


def record_changes(animator: Animator, images, prompts, steps_list, seeds, guidance: float) -> np.ndarray:
    """Rows (steps, step index, relative input change, relative output change) of consecutive steps.
    Hooks the backend's UNet contract: the doubled CFG batch is recombined here as the sampler would."""
    unet = animator.backend.unet
    rows, previous, step = [], {}, [0]

    def recording(x_t, t, text, z1, motion_id):
        eps = unet(x_t, t, text, z1, motion_id)
        x, out = x_t[:1], eps[:1]
        if guidance != 1.0:
            eps_u, eps_c = eps.chunk(2)
            x, out = x_t[:1], eps_u + guidance * (eps_c - eps_u)
        if previous and step[0] < current_steps[0] - 1:
            rows.append((current_steps[0], step[0], float(relative_l1(x, previous["x"])),
                         float(relative_l1(out, previous["out"]))))
        previous.update(x=x, out=out)
        step[0] += 1
        return eps

    current_steps = [0]
    animator.backend.unet = recording  # an instance attribute shadowing the method, for this run only
    try:
        for steps in steps_list:
            current_steps[0] = steps
            for image in images:
                for prompt in prompts:
                    for seed in seeds:
                        previous.clear()
                        step[0] = 0
                        animator(image, prompt, 9, steps=steps, guidance=guidance, seed=seed)
    finally:
        del animator.backend.unet
    return np.asarray(rows)


def fit_polynomial(rows: np.ndarray, degree: int) -> tuple[list[float], float]:
    """Least-squares coefficients (highest power first) and the R^2 of the fit."""
    x, y = rows[:, 2], rows[:, 3]
    coefficients = np.polyfit(x, y, degree)
    residual = y - np.polyval(coefficients, x)
    r2 = 1.0 - float(residual.var() / y.var()) if y.var() > 0 else 1.0
    return [float(c) for c in coefficients], r2


def calibrate(folder: str, *, engines: bool = False, steps_list=(50, 25, 12), images: int = 4, seeds: int = 1,
              degree: int = 2, guidance: float = 7.5, write: bool = False) -> dict:
    animator = (Animator.from_engines(folder) if engines else Animator.from_checkpoint(folder, device="cpu"))
    side = min(animator.defaults.height, animator.defaults.width)
    pictures = [fit(photo(name), side) for name in TRAIN_PHOTOS[:images]]
    start = time.perf_counter()
    rows = record_changes(animator, pictures, PROMPTS, steps_list, range(seeds), guidance)
    coefficients, r2 = fit_polynomial(rows, degree)
    entry = {"coefficients": [round(c, 6) for c in coefficients], "r2": round(r2, 4),
             "indicator": "relative L1 change of x_t between consecutive steps",
             "target": "relative L1 change of the guided model output",
             "fitted_on": {"steps": list(steps_list), "images": list(TRAIN_PHOTOS[:images]), "prompts": list(PROMPTS),
                           "seeds": seeds, "guidance": guidance, "pairs": int(len(rows))},
             "seconds": round(time.perf_counter() - start, 1)}
    if write:
        store_calibration(folder, entry)
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=str(ROOT / "cinemo_rt" / "assets" / "demo"))
    source.add_argument("--engines", default=None, help="an engines folder (its cinemo_rt.json gets the entry)")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 25, 12])
    parser.add_argument("--images", type=int, default=4, help="how many training photos to calibrate on")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="store the fit in the folder's cinemo_rt.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    folder = args.engines or args.checkpoint
    entry = calibrate(folder, engines=args.engines is not None, steps_list=args.steps, images=args.images,
                      seeds=args.seeds, degree=args.degree, write=args.write)
    print(f"{folder}: coefficients {entry['coefficients']} (R^2 {entry['r2']}, {entry['fitted_on']['pairs']} "
          f"step pairs, {entry['seconds']} s){' -> written' if args.write else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
