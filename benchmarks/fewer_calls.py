"""Fewer UNet calls per video: each setting against the 50-step DDIM + CFG video of the same image and seed.

    python benchmarks/fewer_calls.py [--checkpoint cinemo_rt/assets/demo] [--seeds 2] [--controls]

For every setting (step count, step cache, guidance truncation and their combinations): single-image UNet
calls per video (a CFG call counts 2), the median wall time of the denoising stage, PSNR and SSIM of the video
against the reference (mean, and the worst PSNR) and the mean consecutive-frame SSIM (motion: it should stay
near the reference's), over the held-out images of benchmarks/controls.py, two prompts and several seeds.
The Pareto front (fewest calls for a PSNR) is marked and drawn (calls vs PSNR). With --controls the demo's
controls (bucket -> SSIM Spearman, paired "pan left" - "pan right" sign) are measured with the reference and
with the fast preset, using controls.py's functions.

Writes fewer_calls.json, fewer_calls.md and fewer_calls_pareto.png under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from controls import bucket_curve, direction_test, open_demo, psnr  # noqa: E402
from cinemo_rt.fewer_calls import IDENTITY  # noqa: E402
from cinemo_rt.motion import mean_consecutive_ssim  # noqa: E402
from cinemo_rt.pipeline import Animator  # noqa: E402
from cinemo_rt.request import FAST_PRESET, REFERENCE_STEPS, FewerCalls  # noqa: E402

PROMPTS = ("pan left", "zoom in")
BUCKET = 9
CONTROLS_FILE = "fewer_calls_controls.json"
TARGET = {"call_ratio": 3.0, "psnr_db": 30.0}  # the target against 50-step DDIM + CFG


@dataclasses.dataclass(frozen=True)
class Setting:
    family: str
    steps: int
    options: FewerCalls = FewerCalls()
    calibrated: bool = True  # False: the cache indicator without the checkpoint's fitted polynomial
    sampler: str = "ddim"

    @property
    def label(self) -> str:
        o, parts = self.options, [f"{self.steps} steps" + ("" if self.sampler == "ddim" else f" {self.sampler}")]
        if o.cache is not None:
            parts.append(f"cache {o.cache:g}" + ("" if o.cache_reuse == "extrapolate" else f" ({o.cache_reuse})")
                         + ("" if self.calibrated else " (uncalibrated)"))
        if o.guidance_until < 1.0:
            parts.append(f"guidance until {o.guidance_until:g}" + (f" every {o.guidance_every}" if o.guidance_every
                                                                  else ""))
        return ", ".join(parts)


def settings() -> list[Setting]:
    """The sweep: bounded to a few minutes on one CPU thread for the demo model."""
    out = [Setting("DDIM steps", s) for s in (50, 25, 16, 12, 10, 8, 6)]
    out += [Setting("step cache", 50, FewerCalls(cache=c)) for c in (0.2, 0.5, 0.8, 1.2)]
    out += [Setting("step cache", 25, FewerCalls(cache=c)) for c in (0.3, 0.5, 0.8, 1.2)]
    out += [Setting("step cache", 16, FewerCalls(cache=c)) for c in (0.3, 0.6)]
    out += [Setting("step cache, uncalibrated", 50, FewerCalls(cache=c), calibrated=False) for c in (0.1, 0.2)]
    out += [Setting("step cache, output reused", 50, FewerCalls(cache=c, cache_reuse="output")) for c in (0.2, 0.5)]
    out += [Setting("guidance truncation", 50, FewerCalls(guidance_until=g)) for g in (0.5, 0.7, 0.85)]
    out += [Setting("guidance refresh", s, FewerCalls(guidance_until=0.0, guidance_every=2)) for s in (50, 25)]
    out += [Setting("cache + guidance", 50, FewerCalls(cache=0.3, guidance_until=0.0, guidance_every=2)),
            Setting("cache + guidance", 25, FewerCalls(cache=0.3, guidance_until=0.85))]
    dpm = "dpmpp-2m"
    out += [Setting("DPM-Solver++(2M) steps", s, sampler=dpm) for s in (20, 10, 8, 6, 5, 4)]
    out += [Setting("DPM-Solver++(2M) + cache", s, FewerCalls(cache=c), sampler=dpm)
            for s, c in ((25, 0.5), (20, 0.5), (20, 0.8), (10, 0.5), (10, 0.8))]
    preset = Setting("fast preset", FAST_PRESET.steps, FAST_PRESET.fewer_calls, sampler=FAST_PRESET.sampler)
    return out if any(s.label == preset.label for s in out) else out + [preset]


def frame_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of the colour SSIM (skimage, data range 255) of two (T, H, W, 3) uint8 videos."""
    from skimage.metrics import structural_similarity

    return float(np.mean([structural_similarity(x, y, channel_axis=-1, data_range=255) for x, y in zip(a, b)]))


def jobs(images: dict[str, np.ndarray], seeds: list[int]) -> list[tuple[str, np.ndarray, str, int]]:
    return [(name, img, p, s) for name, img in images.items() for p in PROMPTS for s in seeds]


def measure(animator: Animator, setting: Setting, work, references: list[np.ndarray], **size) -> dict:
    """One setting over every job: calls, denoise time, fidelity to the references, motion."""
    calls, seconds, psnrs, ssims, motion = [], [], [], [], []
    fitted = animator.cache_coefficients
    if not setting.calibrated:
        animator.cache_coefficients = IDENTITY
    for (_, image, prompt, seed), reference in zip(work, references):
        video = animator(image, prompt, BUCKET, seed=seed, steps=setting.steps, **setting.options.as_fields(),
                         sampler=setting.sampler, **size)
        calls.append(animator.last_unet_calls)
        seconds.append(animator.last_timings["5 denoise"])
        psnrs.append(min(psnr(video, reference), 99.0))  # identical videos: report 99 dB, not infinity
        ssims.append(frame_ssim(video, reference))
        motion.append(mean_consecutive_ssim(video))
    animator.cache_coefficients = fitted
    return {"label": setting.label, "family": setting.family, "steps": setting.steps, "sampler": setting.sampler,
            "options": dataclasses.asdict(setting.options), "unet_calls": float(np.mean(calls)),
            "denoise_ms_median": round(1000 * statistics.median(seconds), 1),
            "psnr_db": round(float(np.mean(psnrs)), 2), "psnr_db_min": round(float(np.min(psnrs)), 2),
            "ssim": round(float(np.mean(ssims)), 4), "consecutive_ssim": round(float(np.mean(motion)), 4)}


def pareto(rows: list[dict]) -> None:
    """Mark rows that no other row beats on both calls (fewer or equal) and PSNR (higher or equal)."""
    for r in rows:
        r["pareto"] = not any((o["unet_calls"] <= r["unet_calls"] and o["psnr_db"] >= r["psnr_db"])
                              and (o["unet_calls"], o["psnr_db"]) != (r["unet_calls"], r["psnr_db"]) for o in rows)


def plot(rows: list[dict], path: Path, reference_calls: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    families = list(dict.fromkeys(r["family"] for r in rows))
    for i, family in enumerate(families):
        pts = [r for r in rows if r["family"] == family and r["psnr_db"] < 99]
        ax.scatter([r["unet_calls"] for r in pts], [r["psnr_db"] for r in pts], label=family,
                   marker="os^vDP*X"[i % 8], s=36)
    front = sorted((r for r in rows if r["pareto"] and r["psnr_db"] < 99), key=lambda r: r["unet_calls"])
    ax.plot([r["unet_calls"] for r in front], [r["psnr_db"] for r in front], "k--", lw=0.8, label="Pareto front")
    ax.axhline(TARGET["psnr_db"], color="grey", lw=0.6)
    ax.axvline(reference_calls / TARGET["call_ratio"], color="grey", lw=0.6)
    ax.set_xlabel("single-image UNet calls per video (50-step DDIM + CFG = %d)" % reference_calls)
    ax.set_ylabel("PSNR vs 50-step DDIM + CFG (dB)")
    ax.set_title("Fewer UNet calls: fidelity to the reference (demo model, held-out images)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def controls(animator: Animator, images: dict[str, np.ndarray], seeds: int, direction_seeds: int,
             earlier: dict | None = None) -> dict:
    """controls.py's bucket and left/right measures, with the reference settings and with the fast preset.
    The reference's entry of an `earlier` run with the same images and seeds is kept (it does not depend on
    the preset)."""
    out = {}
    for name, kw in (("50-step DDIM + CFG", {}), ("fast preset", {"fast": True})):
        if name != "fast preset" and earlier and name in earlier.get("runs", {}) and \
                (earlier["control_seeds"], earlier["direction_seeds"], earlier["images"]) == \
                (seeds, direction_seeds, list(images)):
            out[name] = earlier["runs"][name]
            continue
        def run(image, prompt, bucket, seed, kw=kw):
            return animator(image, prompt, bucket, seed=seed, **kw)

        start = time.perf_counter()
        out[name] = {"bucket_ssim": bucket_curve(run, images, list(range(seeds))),
                     "direction": direction_test(run, images, list(range(direction_seeds)), animator.defaults,
                                                 pairs=(("pan left", "pan right"),)),
                     "seconds": round(time.perf_counter() - start, 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "cinemo_rt" / "assets" / "demo"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--controls", action="store_true",
                        help="only the controls with and without the preset, into fewer_calls_controls.json (the "
                             "sweep's report includes that file when present)")
    parser.add_argument("--control-seeds", type=int, default=1, help="seeds per image for the bucket curve")
    parser.add_argument("--direction-seeds", type=int, default=8, help="seeds per image for left/right pairs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="measure only the settings whose family contains TEXT and merge them into the existing "
                             "fewer_calls.json in --out (rows of the same label replaced)")
    parser.add_argument("--report", action="store_true",
                        help="only re-render fewer_calls.md and the plot from the JSON files in --out (e.g. after "
                             "--controls), the Pareto front recomputed")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report:
        result = json.loads((out / "fewer_calls.json").read_text())
        if (out / CONTROLS_FILE).is_file():
            result["controls"] = json.loads((out / CONTROLS_FILE).read_text())
        result["fast_preset"] = dataclasses.asdict(FAST_PRESET)
        pareto(result["rows"])
        plot(result["rows"], out / "fewer_calls_pareto.png", result["reference_calls"])
        (out / "fewer_calls.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "fewer_calls.md").write_text(report(result))
        return 0
    start = time.perf_counter()
    animator, images = open_demo(args.checkpoint, args.threads)
    d = animator.defaults
    out.mkdir(parents=True, exist_ok=True)
    if args.controls:
        result = {"preset": dataclasses.asdict(FAST_PRESET),
                  "images": list(images), "control_seeds": args.control_seeds, "direction_seeds": args.direction_seeds,
                  "runs": controls(animator, images, args.control_seeds, args.direction_seeds,
                                   json.loads((out / CONTROLS_FILE).read_text()) if (out / CONTROLS_FILE).is_file()
                                   else None),
                  "seconds": round(time.perf_counter() - start, 1)}
        (out / CONTROLS_FILE).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    work = jobs(images, list(range(args.seeds)))
    references = [animator(img, p, BUCKET, seed=s, steps=REFERENCE_STEPS) for _, img, p, s in work]
    reference_calls = animator.last_unet_calls
    chosen = [s for s in settings() if args.only is None or args.only in s.family]
    merge = args.only and (out / "fewer_calls.json").is_file()
    earlier = json.loads((out / "fewer_calls.json").read_text()) if merge else {"rows": [], "seconds": 0.0}
    labels = {s.label for s in chosen}
    rows = [r for r in earlier["rows"] if r["label"] not in labels]
    for setting in chosen:
        rows.append(measure(animator, setting, work, references))
        logging.getLogger("fewer_calls").warning("%-60s %6.1f calls %6.2f dB", setting.label, rows[-1]["unet_calls"],
                                                 rows[-1]["psnr_db"])
    pareto(rows)
    checkpoint = Path(args.checkpoint).resolve()
    result = {"checkpoint": str(checkpoint.relative_to(ROOT)) if checkpoint.is_relative_to(ROOT) else str(checkpoint),
              "calibration": animator.cache_coefficients,
              "settings": {"images": list(images), "prompts": list(PROMPTS), "bucket": BUCKET,
                           "seeds": list(range(args.seeds)), "height": d.height, "width": d.width, "frames": d.frames,
                           "threads": args.threads, "torch": torch.__version__},
              "reference_calls": reference_calls, "rows": rows,
              "fast_preset": dataclasses.asdict(FAST_PRESET)}
    result["seconds"] = round(earlier["seconds"] + time.perf_counter() - start, 1)
    if (out / CONTROLS_FILE).is_file():
        result["controls"] = json.loads((out / CONTROLS_FILE).read_text())
    (out / "fewer_calls.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / "fewer_calls_pareto.png", reference_calls)
    (out / "fewer_calls.md").write_text(report(result))
    print(report(result))
    return 0


def report(r: dict) -> str:
    s = r["settings"]
    lines = ["# Fewer UNet calls per video: fidelity against 50-step DDIM + CFG", "",
             f"`{r['checkpoint']}`, {len(s['images'])} held-out images ({', '.join(s['images'])}) x prompts "
             f"{', '.join(s['prompts'])} (bucket {s['bucket']}) x seeds {s['seeds']}, {s['frames']} frames at "
             f"{s['height']}x{s['width']}; CPU, {s['threads']} thread, torch {s['torch']}. Step-cache calibration "
             f"(cinemo_rt.json): {r['calibration']}.", "",
             "Calls: single-image UNet calls per video (a CFG call counts 2). PSNR / SSIM: against the 50-step "
             "DDIM + CFG video of the same image, prompt and seed (mean; min = worst video). Motion: mean "
             "consecutive-frame SSIM (the reference's is the first row). * = on the Pareto front.", "",
             "| setting | family | calls | x fewer | denoise ms (median) | PSNR dB | min PSNR | SSIM | motion SSIM |",
             "|---|---|---|---|---|---|---|---|---|"]
    preset_label = Setting("fast preset", FAST_PRESET.steps, FAST_PRESET.fewer_calls, sampler=FAST_PRESET.sampler).label
    for row in r["rows"]:
        name = f"**{row['label']}** (`--fast`)" if row["label"] == preset_label else row["label"]
        lines.append(f"| {name}{' *' if row['pareto'] else ''} | {row['family']} | {row['unet_calls']:.1f} | "
                     f"{r['reference_calls'] / row['unet_calls']:.2f} | {row['denoise_ms_median']:.0f} | "
                     f"{row['psnr_db']:.2f} | {row['psnr_db_min']:.2f} | {row['ssim']:.4f} | "
                     f"{row['consecutive_ssim']:.4f} |")
    p = r["fast_preset"]
    o = p["fewer_calls"]
    lines += ["", f"Fast preset (`cinemo-rt run --fast`): {p['sampler']}, {p['steps']} steps, cache {o['cache']} "
              f"({o['cache_reuse']}), guidance until {o['guidance_until']}"
              + (f" every {o['guidance_every']}" if o["guidance_every"] else "") + "."]
    if "controls" in r:
        c = r["controls"]
        lines += ["", "## Controls with and without the preset", "",
                  f"`benchmarks/fewer_calls.py --controls` ({CONTROLS_FILE}): controls.py's measures on the same held-out "
                  f"images; bucket curve over buckets 0..19 x prompts {', '.join(c['runs']['fast preset']['bucket_ssim']['prompts'])} "
                  f"x {c['control_seeds']} seed(s); 'pan left' - 'pan right' paired by image and seed ({c['direction_seeds']} seeds "
                  f"per image, bucket 12), with the fast preset above.", "",
                  "| run | bucket Spearman | pan left - pan right (px/frame) | 95% interval | pairs with the training sign | seconds |",
                  "|---|---|---|---|---|---|"]
        for name, c in c["runs"].items():
            pair = next(iter(c["direction"]["paired"].values()))
            lines.append(f"| {name} | {c['bucket_ssim']['spearman']:+.3f} | {pair['mean_px_per_frame']:+.3f} | "
                         f"[{pair['ci95'][0]:+.3f}, {pair['ci95'][1]:+.3f}] | {100 * pair['sign_agreement']:.0f}% of "
                         f"{pair['n']} | {c['seconds']} |")
    lines += ["", "## Notes", "",
              "- Denoise times are medians over the jobs of a setting on a CPU shared with other jobs (load 5-11 on 2 "
              "cores during the run): indicative only; the call counts are exact. The full-size time of `--fast` is "
              "`latency.py`'s `end_to_end_fast` stage on a GPU.",
              "- The step cache skips the UNet while the accumulated estimate stays under the threshold; a higher "
              "threshold or fewer steps skip more. The same threshold skips a different share at another step count.",
              "- The DPM-Solver++(2M) rows were measured in a second run (`--only DPM`) against the same references "
              "and merged; the cache wraps the raw model output under either sampler.",
              "- Re-calibrating on the real weights: `python benchmarks/calibrate_cache.py --checkpoint DIR --write` "
              "(fits the indicator on that model, stores it in DIR/cinemo_rt.json), then `python "
              "benchmarks/fewer_calls.py --checkpoint DIR` and pick the preset from the new front; the released "
              "model (320x512x16, epsilon prediction) may change its output at another pace than this 32x32 "
              "v-prediction demo.",
              "", f"Total time: {r['seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
