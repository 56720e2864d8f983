"""Evidence that a checkpoint learned Cinemo's controls, measured on images held out from training.

    python benchmarks/controls.py [--checkpoint cinemo_rt/assets/demo] [--steps 25] [--out benchmarks/results]

1. Motion buckets: the mean SSIM of consecutive generated frames over buckets 0..19 (it should fall as the
   bucket rises; Spearman rank correlation reported).
2. Prompts steer direction: mean frame-to-frame displacement (phase correlation, sub-pixel) for "pan left"
   vs "pan right" and "pan up" vs "pan down"; the sign the training clips have for the same caption
   (rendered from the same held-out images) is reported beside it. Each pair is also compared paired: the
   same image and seed (so the same initial noise) with the two opposite prompts, the difference along the
   pair's axis, its mean with a 95% interval and the share of pairs whose difference has the training sign.
3. Frame 0 stays the input image: PSNR of output frame 0 against the preprocessed input, and the VAE's own
   round-trip PSNR (the ceiling, since frame 0 is decode(z1)).
4. DCTInit on vs off: temporal smoothness (mean |x[t+1] - 2 x[t] + x[t-1]|, lower is smoother) and the
   mean PSNR of frames 1..F against frame 0 (appearance drift).

Writes controls.json, controls.md, controls_strip.png (upscaled frame strips) and controls_example.gif under
--out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cinemo_rt.demo_data import HELD_OUT, drawn_scene, photo, render_clip  # noqa: E402
from cinemo_rt.motion import mean_consecutive_ssim  # noqa: E402
from cinemo_rt.pipeline import Animator  # noqa: E402

BUCKET_PROMPTS = ("pan left", "zoom in")
DIRECTION_PAIRS = (("pan left", "pan right"), ("pan up", "pan down"))
DIRECTION_BUCKET = 12
HELD_OUT_SCENE_SEED = 987_654  # the training scenes use seeds [demo_seed, clip index]


def fit(image: np.ndarray, side: int) -> np.ndarray:
    """Antialiased (LANCZOS) downscale so the short side is side + 1: the pipeline's reference preprocessing
    resizes bilinearly without antialiasing, which aliases badly at the demo's 32 pixels; the training clips
    were antialiased, so the evaluation inputs are too."""
    from PIL import Image

    h, w = image.shape[:2]
    s = (side + 1) / min(h, w)
    return np.asarray(Image.fromarray(image).resize((max(side + 1, round(w * s)), max(side + 1, round(h * s))),
                                                    Image.LANCZOS))


def held_out_images(side: int) -> dict[str, np.ndarray]:
    images = {name: photo(name) for name in HELD_OUT}
    for k in range(2):
        images[f"scene_{k}"] = drawn_scene(np.random.default_rng([HELD_OUT_SCENE_SEED, k]))
    return {name: fit(img, side) for name, img in images.items()}


def gray(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0  # (T, H, W)


def mean_shift(frames: np.ndarray) -> tuple[float, float]:
    """Mean (dx, dy) in pixels of content between consecutive frames (positive: moves right / down)."""
    from skimage.registration import phase_cross_correlation

    g = gray(frames)
    shifts = []
    for a, b in zip(g[:-1], g[1:]):
        # phase_cross_correlation(ref, moving) returns the shift that registers `moving` onto `ref`,
        # i.e. minus the content motion from a to b.
        shift, _, _ = phase_cross_correlation(a, b, upsample_factor=20, normalization=None)
        shifts.append(-shift)
    dy, dx = np.mean(shifts, axis=0)
    return float(dx), float(dy)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def jerk(frames: np.ndarray) -> float:
    x = frames.astype(np.float64)
    return float(np.abs(x[2:] - 2 * x[1:-1] + x[:-2]).mean()) if len(x) > 2 else 0.0


def paired_difference(a: list[float], b: list[float], expected_sign: float) -> dict:
    """a[i] - b[i] for samples that differ only in the prompt: mean, a normal 95% interval of the mean, and
    the share of differences with the expected sign."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    return {"mean_px_per_frame": round(float(d.mean()), 4),
            "ci95": [round(float(d.mean() - half), 4), round(float(d.mean() + half), 4)],
            "expected_sign": int(expected_sign), "sign_agreement": round(float(np.mean(np.sign(d) == expected_sign)), 3),
            "n": int(len(d))}


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def strip(videos: list[np.ndarray], scale: int = 3) -> np.ndarray:
    """Rows of frames, nearest-upscaled, 2-pixel white gaps."""
    rows = []
    for v in videos:
        big = v.repeat(scale, 1).repeat(scale, 2)
        pad = np.full((big.shape[0], big.shape[1], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([np.concatenate([f, p], 1) for f, p in zip(big, pad)], 1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows, 0)


RunFn = Callable[[np.ndarray, str, int, int], np.ndarray]  # (image, prompt, bucket, seed) -> uint8 video


def bucket_curve(run: RunFn, images: dict[str, np.ndarray], seeds: list[int],
                 prompts: tuple[str, ...] = BUCKET_PROMPTS) -> dict:
    """Mean consecutive SSIM per bucket 0..19 over images, prompts and seeds, and its Spearman correlation
    with the bucket (-1: more motion with every bucket step)."""
    curve = []
    for b in range(20):
        values = [mean_consecutive_ssim(run(img, p, b, s)) for img in images.values() for p in prompts for s in seeds]
        curve.append(float(np.mean(values)))
    return {"buckets": list(range(20)), "mean_ssim": [round(v, 4) for v in curve],
            "spearman": round(spearman(range(20), curve), 4), "prompts": list(prompts)}


def direction_test(run: RunFn, images: dict[str, np.ndarray], seeds: list[int], defaults,
                   pairs: tuple[tuple[str, str], ...] = DIRECTION_PAIRS) -> dict:
    """Per prompt: mean displacement along its axis and sign agreement with the training clips rendered from
    the same images; per pair: the paired difference (same image and seed, only the prompt differs)."""
    directions, per_sample, paired = {}, {}, {}
    for pair in pairs:
        for prompt in pair:
            motion = prompt.replace(" ", "_")
            gen, ref = [], []
            for img in images.values():
                for s in seeds:
                    gen.append(mean_shift(run(img, prompt, DIRECTION_BUCKET, s)))
                clip = render_clip(img, motion, 0.03, defaults.frames + 1, defaults.height, np.random.default_rng(0))
                ref.append(mean_shift(clip))
            axis = 0 if "left" in prompt or "right" in prompt else 1
            values = [g[axis] for g in gen]
            directions[prompt] = {"axis": "x" if axis == 0 else "y",
                                  "generated_mean_px_per_frame": round(float(np.mean(values)), 4),
                                  "generated_sign_agreement": round(float(np.mean(
                                      np.sign(values) == np.sign(np.mean([r[axis] for r in ref])))), 3),
                                  "training_clip_px_per_frame": round(float(np.mean([r[axis] for r in ref])), 4)}
            per_sample[prompt] = values
        first, second = pair
        training_sign = np.sign(directions[first]["training_clip_px_per_frame"]
                                - directions[second]["training_clip_px_per_frame"])
        paired[f"{first} - {second}"] = paired_difference(per_sample[first], per_sample[second], training_sign)
    return {"bucket": DIRECTION_BUCKET, "seeds": seeds, "by_prompt": directions, "paired": paired}


def open_demo(checkpoint: str, threads: int) -> tuple[Animator, dict[str, np.ndarray]]:
    """The set-up every demo benchmark shares: CPU threads, quiet logs, the checkpoint on the CPU and the held-out
    images at its size."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    animator = Animator.from_checkpoint(checkpoint, device="cpu")
    return animator, held_out_images(min(animator.defaults.height, animator.defaults.width))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "cinemo_rt" / "assets" / "demo"),
                        help="checkpoint folder to measure (the bundled demo by default)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per video")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seeds", type=int, default=2,
                        help="seeds per image and bucket for the bucket (SSIM) and frame-0 measurements")
    parser.add_argument("--direction-seeds", type=int, default=8,
                        help="seeds per image for the direction test; each seed pairs the two opposite prompts")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for the demo's small UNet; see cpu_threads.py)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="folder for controls.json/.md and the example GIF and strip")
    args = parser.parse_args()
    start = time.perf_counter()
    animator, images = open_demo(args.checkpoint, args.threads)
    d = animator.defaults
    seeds = list(range(args.seeds))

    def run(image, prompt, bucket, seed, use_dct=True):
        return animator(image, prompt, bucket, steps=args.steps, guidance=args.guidance, seed=seed,
                        use_dct=use_dct)

    from cinemo_rt.image import preprocess

    def input_pixels(image) -> np.ndarray:
        x = preprocess(image, d.height, d.width)  # (1, 3, H, W) in [-1, 1]
        return ((x[0].permute(1, 2, 0).float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    results: dict = {"checkpoint": str(Path(args.checkpoint).resolve().relative_to(ROOT))
                     if Path(args.checkpoint).resolve().is_relative_to(ROOT) else args.checkpoint,
                     "settings": {"steps": args.steps, "guidance": args.guidance, "seeds": seeds,
                                  "height": d.height, "width": d.width, "frames": d.frames,
                                  "held_out_images": list(images)}}

    # 1. buckets -> SSIM
    results["bucket_ssim"] = bucket_curve(run, images, seeds)
    # 2. direction from the prompt
    results["direction"] = direction_test(run, images, list(range(args.direction_seeds)), d)

    # 3. frame 0 and 4. DCTInit
    frame0, vae_ceiling, dct = [], [], {"on": {"jerk": [], "drift_psnr": []}, "off": {"jerk": [], "drift_psnr": []}}
    for img in images.values():
        pix = input_pixels(img)
        for s in seeds:
            for use_dct, key in ((True, "on"), (False, "off")):
                video = run(img, "pan left", 9, s, use_dct=use_dct)
                if use_dct:
                    frame0.append(psnr(video[0], pix))
                dct[key]["jerk"].append(jerk(video))
                dct[key]["drift_psnr"].append(float(np.mean([psnr(f, video[0]) for f in video[1:]])))
        with torch.no_grad():
            mean, _ = animator.backend.vae_encoder(preprocess(img, d.height, d.width))
            z = (mean * animator.backend.info.scaling_factor).unsqueeze(2)  # (1, 4, 1, h, w)
            from cinemo_rt.components import images_to_uint8
            from cinemo_rt.stages import decode_latents

            rec = decode_latents(animator.backend, z)

            vae_ceiling.append(psnr(images_to_uint8(rec, rounding=True)[0, 0].cpu().numpy(), pix))
    results["frame0"] = {"psnr_db": round(float(np.mean(frame0)), 2),
                         "vae_roundtrip_psnr_db": round(float(np.mean(vae_ceiling)), 2)}
    results["dctinit"] = {k: {m: round(float(np.mean(v)), 4) for m, v in vals.items()} for k, vals in dct.items()}
    results["dctinit"]["prompt"], results["dctinit"]["bucket"] = "pan left", 9

    # Frame strips of the example image: buckets 2 / 10 / 18 with "pan left", then "pan right", "zoom in".
    from cinemo_rt.defaults import EXAMPLE_IMAGE
    from PIL import Image

    rows = [("pan left", 2), ("pan left", 10), ("pan left", 18), ("pan right", 18), ("zoom in", 18)]
    example = fit(np.asarray(Image.open(EXAMPLE_IMAGE).convert("RGB")), min(d.height, d.width))
    videos = [run(example, p, b, 0) for p, b in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip(videos)).save(out / "controls_strip.png")
    results["strip_rows"] = [f"{p!r}, bucket {b}" for p, b in rows]
    # README animation: the example photo with "pan left" / "pan right" / "zoom in" at bucket 15, side by side.
    from cinemo_rt.video import write_video

    gif_prompts = ("pan left", "pan right", "zoom in")
    clips = [run(example, p, 15, 0).repeat(4, 1).repeat(4, 2) for p in gif_prompts]
    gap = np.full((clips[0].shape[0], clips[0].shape[1], 4, 3), 255, np.uint8)
    gif = write_video(np.concatenate([clips[0], gap, clips[1], gap, clips[2]], axis=2), out / "controls_example.gif",
                      fps=6, overwrite=True)
    gif.chmod(0o644)  # written through a private temporary file
    results["gif"] = f"controls_example.gif: {', '.join(gif_prompts)} at bucket 15 (x4 nearest upscale)"
    results["seconds"] = round(time.perf_counter() - start, 1)

    write_results(out, "controls", results, report(results))
    return 0


def write_results(out: Path, stem: str, results: dict, text: str) -> None:
    """<stem>.json and the <stem>.md report under `out`; the report is printed too."""
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)


def report(r: dict) -> str:
    s = r["settings"]
    lines = [f"# Controls of `{r['checkpoint']}` on held-out images", "",
             f"{len(s['held_out_images'])} held-out images ({', '.join(s['held_out_images'])}), seeds {s['seeds']}, "
             f"{s['steps']} DDIM steps, guidance {s['guidance']}, {s['frames']} frames at {s['height']}x{s['width']}.",
             "", "## 1. Bucket -> mean consecutive SSIM (should fall as the bucket rises)", "",
             "| bucket | " + " | ".join(str(b) for b in r["bucket_ssim"]["buckets"]) + " |",
             "|---|" + "---|" * 20,
             "| SSIM | " + " | ".join(f"{v:.3f}" for v in r["bucket_ssim"]["mean_ssim"]) + " |", "",
             f"Spearman rank correlation (bucket, SSIM): **{r['bucket_ssim']['spearman']:+.3f}** "
             f"(prompts {', '.join(r['bucket_ssim']['prompts'])}).", "",
             f"## 2. Direction from the prompt (bucket {r['direction']['bucket']}, phase correlation)", "",
             "| prompt | axis | generated px/frame | sign agrees with training clips | training clip px/frame |",
             "|---|---|---|---|---|"]
    for p, v in r["direction"]["by_prompt"].items():
        lines.append(f"| {p} | {v['axis']} | {v['generated_mean_px_per_frame']:+.3f} | "
                     f"{100 * v['generated_sign_agreement']:.0f}% | {v['training_clip_px_per_frame']:+.3f} |")
    lines += ["", f"Paired by image and seed (seeds {r['direction']['seeds']}; the same initial noise, only the "
              "prompt differs):", "",
              "| difference | mean px/frame | 95% interval | training sign | pairs with that sign |",
              "|---|---|---|---|---|"]
    for name, v in r["direction"]["paired"].items():
        lines.append(f"| {name} | {v['mean_px_per_frame']:+.3f} | [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] | "
                     f"{'+' if v['expected_sign'] > 0 else '-'} | {100 * v['sign_agreement']:.0f}% of {v['n']} |")
    lines += ["", "## 3. Frame 0 is the input", "",
              f"PSNR(frame 0, input) = {r['frame0']['psnr_db']:.2f} dB; the VAE round trip of the input "
              f"(posterior mean) gives {r['frame0']['vae_roundtrip_psnr_db']:.2f} dB.", "",
              f"## 4. DCTInit on vs off ({r['dctinit']['prompt']!r}, bucket {r['dctinit']['bucket']})", "",
              "| DCTInit | jerk (mean abs 2nd temporal difference, lower = smoother) | mean PSNR frames vs frame 0 |",
              "|---|---|---|"]
    for k in ("on", "off"):
        lines.append(f"| {k} | {r['dctinit'][k]['jerk']:.3f} | {r['dctinit'][k]['drift_psnr']:.2f} dB |")
    lines += ["", f"Frame strips (`controls_strip.png`, rows): {'; '.join(r['strip_rows'])}.", f"{r['gif']}.",
              f"Total time: {r['seconds']} s on the CPU.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
