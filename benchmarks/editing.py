"""Evidence for video editing and motion transfer on the demo checkpoint, on held-out images.

    OMP_NUM_THREADS=1 python benchmarks/editing.py [--checkpoint cinemo_rt/assets/demo] [--out benchmarks/results]

1. Reconstruction: invert a clip and sample it back with its own first frame, its caption as source and
   target prompt, DCTInit off, guidance 1 (docs/METHOD.md, editing). PSNR of frames 1..F against the input clip
   (as the model sees it: resized and cropped) and against the VAE round trip of the same posterior samples
   (decode(encode(clip))), the ceiling that isolates the inversion's own error; for 10, 25 and 50 steps.
2. Motion transfer: demo-style clips (pan left / right / up / down, zoom in; rendered by
   `cinemo_rt.demo_data.render_clip` from one held-out image) transferred onto each *other* held-out image.
   The transferred motion along the clip's axis (phase correlation, px/frame; for zoom the divergence of the
   left/right and top/bottom halves) signed so that positive = the source's direction: share of clips,
   mean and 95% interval. Two edits (target prompt = the caption, and an empty target prompt, so that only
   the inverted latents can carry the direction) against the control: the same image animated by the
   caption alone (`run`, guidance 7.5, the same bucket).
3. Latency per stage of one edit on the CPU (median of --repeats after a warm-up), next to `run`'s.

Writes editing.json, editing.md and editing_strip.png under --out.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from controls import mean_shift, open_demo, paired_difference, psnr, strip, write_results  # noqa: E402

from cinemo_rt import stages  # noqa: E402
from cinemo_rt.demo_data import CAPTIONS, render_clip  # noqa: E402
from cinemo_rt.image import preprocess  # noqa: E402
from cinemo_rt.pipeline import Animator, clip_motion_id  # noqa: E402

MOTIONS = {"pan_left": ("x", -1), "pan_right": ("x", 1), "pan_up": ("y", -1), "pan_down": ("y", 1),
           "zoom_in": ("zoom", 1)}
CLIP_SPEED = 0.03  # pans: of the view per frame; zoom: scale per frame; inside demo_data.SPEEDS' ranges
RECONSTRUCTION_STEPS = (10, 25, 50)


def model_view(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """The clip as the model sees it: each frame resized and centre-cropped as the image, back to uint8."""
    x = torch.cat([preprocess(f, height, width) for f in frames])
    return ((x.permute(0, 2, 3, 1) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def vae_round_trip(animator: Animator, frames: np.ndarray, seed: int) -> np.ndarray:
    """decode(encode(clip)) with the posterior samples an edit of this seed draws first."""
    d, backend = animator.defaults, animator.backend
    pixels = torch.cat([preprocess(f, d.height, d.width) for f in frames])
    with torch.no_grad():
        latents = stages.encode_frames(backend, pixels, torch.Generator().manual_seed(seed))
        return stages.to_uint8(backend, stages.decode_latents(backend, latents))[0].numpy()


def zoom_rate(frames: np.ndarray) -> float:
    """Divergence of the content motion, px/frame: right half minus left half along x plus bottom minus top
    along y, halved (positive: the content grows, a zoom in)."""
    h, w = frames.shape[1:3]
    left, right = mean_shift(frames[:, :, : w // 2])[0], mean_shift(frames[:, :, w // 2:])[0]
    top, bottom = mean_shift(frames[:, : h // 2])[1], mean_shift(frames[:, h // 2:])[1]
    return ((right - left) + (bottom - top)) / 2


def motion_along(frames: np.ndarray, axis: str) -> float:
    if axis == "zoom":
        return zoom_rate(frames)
    dx, dy = mean_shift(frames)
    return dx if axis == "x" else dy


def summary(values: list[float]) -> dict:
    """Signed values (positive = the source's direction): share positive, mean, 95% interval."""
    return paired_difference(values, [0.0] * len(values), 1.0)


def median_timings(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: round(statistics.median(r[name] for r in runs) * 1000, 1) for name in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "cinemo_rt" / "assets" / "demo"))
    parser.add_argument("--steps", type=int, default=25, help="steps of the transfer edits and the control")
    parser.add_argument("--reconstruction-steps", type=int, nargs="+", default=list(RECONSTRUCTION_STEPS))
    parser.add_argument("--seeds", type=int, default=1, help="seeds per (clip, image) pair")
    parser.add_argument("--repeats", type=int, default=3, help="timed edits for the latency table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    animator, images = open_demo(args.checkpoint, args.threads)
    d = animator.defaults
    clips = {(motion, name): render_clip(img, motion, CLIP_SPEED, d.frames + 1, d.height,
                                         np.random.default_rng(0))
             for motion in MOTIONS for name, img in images.items()}
    seeds = list(range(args.seeds))
    results: dict = {"checkpoint": Path(args.checkpoint).name, "settings": {
        "height": d.height, "width": d.width, "frames": d.frames, "transfer_steps": args.steps, "seeds": seeds,
        "held_out_images": list(images), "clip_speed": CLIP_SPEED, "threads": args.threads,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}}

    # 1. Reconstruction
    reconstruction = {}
    for steps in args.reconstruction_steps:
        vs_clip, vs_vae = [], []
        for (motion, _), frames in clips.items():
            caption = CAPTIONS[motion][0]
            for seed in seeds:
                video = animator.edit(frames, None, caption, source_prompt=caption, steps=steps, seed=seed,
                                      use_dct=False)
                vs_clip.append(np.mean([psnr(a, b) for a, b in zip(video[1:], model_view(frames, d.height,
                                                                                          d.width)[1:])]))
                vs_vae.append(np.mean([psnr(a, b) for a, b in zip(video[1:], vae_round_trip(animator, frames,
                                                                                             seed)[1:])]))
        reconstruction[steps] = {"psnr_vs_clip_db": round(float(np.mean(vs_clip)), 2),
                                 "psnr_vs_vae_round_trip_db": round(float(np.mean(vs_vae)), 2), "n": len(vs_clip)}
    results["reconstruction"] = reconstruction
    vae_ceiling = [np.mean([psnr(a, b) for a, b in zip(vae_round_trip(animator, f, 0)[1:],
                                                       model_view(f, d.height, d.width)[1:])]) for f in clips.values()]
    results["vae_round_trip_vs_clip_db"] = round(float(np.mean(vae_ceiling)), 2)

    # 2. Motion transfer
    arms = {"edit, caption prompt": [], "edit, empty prompt": [], "control: caption prompt only": []}
    per_motion = {m: {arm: [] for arm in arms} for m in MOTIONS}
    source_values = {}
    examples = {}
    for (motion, source_name), frames in clips.items():
        axis, _ = MOTIONS[motion]
        source = motion_along(frames, axis)
        sign = 1.0 if source >= 0 else -1.0
        source_values[f"{motion} from {source_name}"] = round(source, 4)
        caption = CAPTIONS[motion][0]
        motion_id = clip_motion_id(frames, d)  # what --bucket auto picks; the control gets the same
        for target_name, image in images.items():
            if target_name == source_name:
                continue
            for seed in seeds:
                videos = {"edit, caption prompt": animator.edit(frames, image, caption, source_prompt=caption,
                                                                steps=args.steps, seed=seed, motion_id=motion_id),
                          "edit, empty prompt": animator.edit(frames, image, "", source_prompt=caption,
                                                              steps=args.steps, seed=seed, motion_id=motion_id),
                          "control: caption prompt only": animator(image, caption, None, motion_id=motion_id,
                                                                   steps=args.steps, seed=seed)}
                for arm, video in videos.items():
                    value = sign * motion_along(video, axis)
                    arms[arm].append(value)
                    per_motion[motion][arm].append(value)
                if motion == "pan_right" and seed == 0 and not examples:
                    examples = {"source clip (pan right)": frames, **videos}
    results["transfer"] = {
        "all": {arm: summary(v) for arm, v in arms.items()},
        "pans_only": {arm: summary([x for m in MOTIONS if m.startswith("pan") for x in per_motion[m][arm]])
                      for arm in arms},
        "by_motion": {m: {arm: summary(v) for arm, v in by_arm.items()} for m, by_arm in per_motion.items()},
        "source_px_per_frame": source_values}
    reconstruction_example = animator.edit(examples["source clip (pan right)"], None, "pan right",
                                           source_prompt="pan right", steps=50, seed=0, use_dct=False)
    rows = [*examples.values(), vae_round_trip(animator, examples["source clip (pan right)"], 0),
            reconstruction_example]
    results["strip_rows"] = [*examples, "the source clip's VAE round trip (the demo VAE is lossy at 32x32)",
                             "its reconstruction (50 steps, image omitted, DCTInit off)"]

    # 3. Latency per stage
    frames = clips[("pan_right", next(iter(images)))]
    image = images[list(images)[1]]
    animator.edit(frames, image, "pan right", source_prompt="pan right", steps=args.steps, seed=0)  # warm-up
    edit_runs, run_runs = [], []
    for repeat in range(args.repeats):
        animator.edit(frames, image, "pan right", source_prompt="pan right", steps=args.steps, seed=repeat)
        edit_runs.append(dict(animator.last_timings))
        animator(image, "pan right", 9, steps=args.steps, seed=repeat, guidance=1.0)
        run_runs.append(dict(animator.last_timings))
    results["latency_ms"] = {"edit": median_timings(edit_runs), "run (guidance 1)": median_timings(run_runs),
                             "steps": args.steps, "repeats": args.repeats}
    results["seconds"] = round(time.perf_counter() - started, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(strip(rows, scale=3)).save(out / "editing_strip.png")
    write_results(out, "editing", results, report(results))
    return 0


def report(r: dict) -> str:
    s = r["settings"]
    lines = [f"# Video editing and motion transfer on `{r['checkpoint']}`", "",
             f"`OMP_NUM_THREADS=1 python benchmarks/editing.py` ({r['seconds']:.0f} s on {s['threads']} CPU thread, "
             f"torch {s['torch']}). {s['frames'] + 1}-frame clips at {s['height']}x{s['width']} rendered by "
             f"`cinemo_rt.demo_data.render_clip` (speed {s['clip_speed']}) from the held-out images "
             f"{', '.join(s['held_out_images'])}; seeds {s['seeds']}.", "",
             "## 1. Reconstruction (image omitted, source prompt = target prompt = the caption, DCTInit off, "
             "guidance 1)", "",
             "PSNR of frames 1..F; the VAE round trip decodes the same posterior samples the edit inverts.", "",
             "| steps | vs input clip (dB) | vs VAE round trip (dB) | edits |", "|---|---|---|---|"]
    for steps, v in r["reconstruction"].items():
        lines.append(f"| {steps} | {v['psnr_vs_clip_db']:.2f} | {v['psnr_vs_vae_round_trip_db']:.2f} | {v['n']} |")
    lines += ["", f"The VAE round trip itself against the input clip: {r['vae_round_trip_vs_clip_db']:.2f} dB "
              "(the ceiling of the first column).", "",
              f"## 2. Motion transfer onto the other held-out images ({s['transfer_steps']} steps)", "",
              "Motion along the source clip's axis in px/frame, signed so that positive = the source's direction "
              "(x, y: phase correlation of consecutive frames; zoom: divergence of the halves). Edits: guidance 1, "
              "DCTInit at tau 985, bucket measured on the clip. Control: `run` with the caption alone, guidance "
              "7.5, the same bucket and seed.", "",
              "| clips | arm | share with the source's sign | mean px/frame | 95% interval | n |",
              "|---|---|---|---|---|---|"]
    for group, label in (("all", "all 5 motions"), ("pans_only", "pans")):
        for arm, v in r["transfer"][group].items():
            lines.append(f"| {label} | {arm} | {v['sign_agreement']:.0%} | {v['mean_px_per_frame']:+.3f} | "
                         f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] | {v['n']} |")
    lines += ["", "By motion (share with the source's sign / mean px/frame):", "",
              "| motion | " + " | ".join(r["transfer"]["all"]) + " |", "|---|" + "---|" * len(r["transfer"]["all"])]
    for motion, arms in r["transfer"]["by_motion"].items():
        lines.append(f"| {motion} | " + " | ".join(f"{v['sign_agreement']:.0%} / {v['mean_px_per_frame']:+.3f}"
                                                 for v in arms.values()) + " |")
    lat = r["latency_ms"]
    names = list(lat["edit"])
    lines += ["", f"## 3. Latency per stage on the CPU ({lat['steps']} steps, median of {lat['repeats']}, ms)", "",
              "| stage | edit |", "|---|---|"]
    lines += [f"| {n} | {lat['edit'][n]:.1f} |" for n in names]
    lines += [f"| **total** | **{sum(lat['edit'].values()):.1f}** |", "",
              f"`run` at guidance 1 for comparison: {sum(lat['run (guidance 1)'].values()):.1f} ms in total "
              f"(denoise {lat['run (guidance 1)'].get('5 denoise', 0):.1f} ms): the inversion is one more "
              "denoising loop.", "",
              "## Strip (`editing_strip.png`, x3 nearest)", "",
              "Rows: " + "; ".join(r["strip_rows"]) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
