"""`cinemo-rt run` and `cinemo-rt info`.

Exit codes: 0 success, 1 an unexpected failure (with traceback), 2 bad input or configuration (one clear
message, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("cinemo_rt")

from .backends.registry import BACKENDS, CHOICES
from .request import Request
from .samplers import SAMPLERS
from .settings import DCT_FRACTION, DCT_TAU

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _bucket(value: str) -> int:
    try:
        bucket = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bucket must be a whole number in 0..19, got {value!r}") from None
    if not 0 <= bucket <= 19:
        raise argparse.ArgumentTypeError(f"bucket must be in 0..19 (larger = more motion), got {bucket}")
    return bucket


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cinemo-rt", description="Cinemo image animation runtime")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="animate an image")
    run.add_argument("--image", required=True, help="input still image (PNG, JPEG, ...)")
    run.add_argument("--prompt", required=True, help="text describing the motion")
    motion = run.add_mutually_exclusive_group()
    motion.add_argument("--bucket", type=_bucket, default=9,
                        help="motion intensity 0..19, larger = more motion (default 9)")
    motion.add_argument("--motion-id", type=float, default=None,
                        help="raw motion id for other checkpoints (the released model uses 99 - bucket)")
    run.add_argument("--negative-prompt", default="", help="what to steer away from (default empty)")
    run.add_argument("--steps", type=_positive_int, default=Request.steps, help="sampling steps (default 50)")
    run.add_argument("--sampler", choices=tuple(SAMPLERS), default=Request.sampler,
                     help="ddim (default, the original's) or dpmpp-2m (DPM-Solver++(2M): fewer steps)")
    run.add_argument("--guidance", type=float, default=Request.guidance,
                     help="classifier-free guidance scale (1 = off)")
    run.add_argument("--seed", type=int, default=None, help="random seed (bit-reproducible per backend)")
    run.add_argument("--frames", type=_positive_int, default=None, help="frames to generate (default: model's)")
    run.add_argument("--height", type=_positive_int, default=None, help="output height, divisible by 8")
    run.add_argument("--width", type=_positive_int, default=None, help="output width, divisible by 8")
    run.add_argument("--segments", type=_positive_int, default=1,
                     help="chain N segments, each starting from the previous last frame")
    run.add_argument("--no-dct", action="store_true", help="plain Gaussian initial noise instead of DCTInit")
    run.add_argument("--dct-fraction", type=float, default=DCT_FRACTION, help="DCTInit low-pass box fraction")
    run.add_argument("--dct-tau", type=int, default=DCT_TAU, help="DCTInit noise level of the kept frequencies")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="checkpoint folder in the released layout")
    source.add_argument("--engines", default=None, help="folder built by `python -m export.build_engines`")
    run.add_argument("--backend", choices=CHOICES, default="auto",
                     help="; ".join(f"{e.name}: {e.summary} ({e.source})" for e in BACKENDS.values()))
    run.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    run.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                     help="PyTorch backend precision (default fp16 on CUDA, fp32 on CPU)")
    run.add_argument("--out", default="cinemo.mp4", help="output .mp4, .gif, or a folder for PNG frames")
    run.add_argument("--format", choices=("mp4", "gif", "png"), default=None, help="override the suffix")
    run.add_argument("--fps", type=float, default=8.0, help="frames per second (default 8)")

    sub.add_parser("info", help="versions, devices and usable backends")
    return parser


def _check_output(args) -> None:
    """Fail before any model work: a bad output path is found in milliseconds, not after the denoising."""
    from .video import OutputError, resolve_format

    fmt = resolve_format(args.out, args.format)
    parent = Path(args.out).resolve().parent
    if not parent.is_dir():
        raise OutputError(f"output folder {str(parent)!r} does not exist; create it or choose another --out")
    import os

    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {str(parent)!r} is not writable; choose another --out")
    if fmt != "png" and Path(args.out).is_dir():
        raise OutputError(f"--out {args.out!r} is a folder; give a file name ending in .{fmt}")


def _open_animator(args):
    from .defaults import default_checkpoint
    from .pipeline import Animator

    if args.engines:
        return Animator.from_engines(args.engines, backend=args.backend, device=args.device)
    folder = args.checkpoint
    if folder is None:
        folder = default_checkpoint()
        log.info("no --checkpoint or --engines given: using the embedded demo checkpoint %s", folder)
    return Animator.from_checkpoint(folder, backend=args.backend, device=args.device, dtype=args.dtype)


def build_request(args):
    """The one place the CLI's flags become a `Request`."""
    from .request import DCTInit

    return Request.create(args.prompt, None if args.motion_id is not None else args.bucket, args.motion_id,
                          negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                          frames=args.frames, steps=args.steps, guidance=args.guidance, seed=args.seed,
                          sampler=args.sampler, dct=None if args.no_dct else DCTInit(args.dct_fraction, args.dct_tau))


def cmd_run(args) -> int:
    from tqdm import tqdm

    from .image import load_image
    from .video import write_video

    _check_output(args)
    image = load_image(args.image)  # validated before any model is loaded
    request = build_request(args)
    animator = _open_animator(args)
    log.info("backend: %s on %s (%s)", animator.backend.name, animator.backend.device,
             str(animator.backend.dtype).removeprefix("torch."))
    with tqdm(total=request.steps * args.segments, desc="denoising", unit="step", disable=None) as bar:
        video = animator.run_segments(image, request, args.segments, callback=lambda i, t, x: bar.update(1))
    path = write_video(video, args.out, fps=args.fps, format=args.format)
    for stage, seconds in animator.last_timings.items():
        log.info("  %-16s %8.3f s", stage, seconds)
    log.info("  %-16s %8.3f s", "total", sum(animator.last_timings.values()))
    print(f"wrote {video.shape[0]} frames ({video.shape[2]}x{video.shape[1]}) to {path}")
    return EXIT_OK


def cmd_info(args) -> int:
    from .backends.registry import backend_report

    for line in backend_report():
        print(line)
    return EXIT_OK


def _quiet_libraries() -> None:
    """diffusers/transformers keep their own verbosity; their advice is not for our users."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    from .checkpoint import CheckpointError
    from .errors import InputError
    from .video import OutputError

    try:
        return {"run": cmd_run, "info": cmd_info}[args.command](args)
    except (InputError, CheckpointError, OutputError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    except ValueError as err:  # validation inside the library (format, bucket, steps)
        log.error("%s", err, exc_info=args.verbose)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        log.error("interrupted; no output was written")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
