"""`cinemo-rt run` and `cinemo-rt info`.

Exit codes: 0 success, 1 an unexpected failure (with traceback), 2 bad input or configuration (one clear
message, no traceback), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM; cleaned up the same way).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import validate
from .backends.registry import BACKENDS, CHOICES
from .interrupts import EXIT_INTERRUPTED, EXIT_TERMINATED, exit_code_for, terminate_as_interrupt
from .request import Request
from .samplers import SAMPLERS
from .settings import DCT_FRACTION, DCT_TAU

log = logging.getLogger("cinemo_rt")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED",
           "EXIT_TERMINATED"]


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


def _argument_type(check, name: str):
    """A `validate` check as an argparse type: its message becomes argparse's one-line error (exit 2)."""
    def convert(value: str):
        try:
            return check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = name  # argparse names the type in "invalid <name> value" messages
    return convert


def _finite_float(name: str):
    return _argument_type(lambda v: validate.finite(v, name), "number")


def _seed(value: str) -> int:
    try:
        return validate.seed(int(value))
    except ValueError as err:
        message = str(err) if "seed must" in str(err) else f"seed must be a whole number; got {value!r}"
        raise argparse.ArgumentTypeError(message) from None


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
    motion.add_argument("--motion-id", type=_finite_float("--motion-id"), default=None,
                        help="raw motion id for other checkpoints (the released model uses 99 - bucket)")
    run.add_argument("--negative-prompt", default="", help="what to steer away from (default empty)")
    run.add_argument("--steps", type=_positive_int, default=Request.steps, help="sampling steps (default 50)")
    run.add_argument("--sampler", choices=tuple(SAMPLERS), default=Request.sampler,
                     help="ddim (default, the original's) or dpmpp-2m (DPM-Solver++(2M): fewer steps)")
    run.add_argument("--guidance", type=_finite_float("--guidance"), default=Request.guidance,
                     help="classifier-free guidance scale (1 = off)")
    run.add_argument("--seed", type=_seed, default=None, help="random seed (bit-reproducible per backend)")
    run.add_argument("--frames", type=_positive_int, default=None, help="frames to generate (default: model's)")
    run.add_argument("--height", type=_positive_int, default=None, help="output height, divisible by 8")
    run.add_argument("--width", type=_positive_int, default=None, help="output width, divisible by 8")
    run.add_argument("--segments", type=_positive_int, default=1,
                     help="chain N segments, each starting from the previous last frame")
    run.add_argument("--no-dct", action="store_true", help="plain Gaussian initial noise instead of DCTInit")
    run.add_argument("--dct-fraction", type=_finite_float("--dct-fraction"), default=DCT_FRACTION,
                     help="DCTInit low-pass box fraction")
    run.add_argument("--dct-tau", type=int, default=DCT_TAU, help="DCTInit noise level of the kept frequencies")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="checkpoint folder in the released layout")
    source.add_argument("--engines", default=None, help="folder built by `python -m export.build_engines`")
    run.add_argument("--backend", choices=CHOICES, default="auto",
                     help="; ".join(f"{e.name}: {e.summary} ({e.source})" for e in BACKENDS.values()))
    run.add_argument("--device", type=_argument_type(validate.device_name, "device"), default=None,
                     help="cpu or cuda[:N] (default: cuda when available)")
    run.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                     help="PyTorch backend precision (default fp16 on CUDA, fp32 on CPU)")
    run.add_argument("--out", default="cinemo.mp4", help="output .mp4, .gif, or a folder for PNG frames")
    run.add_argument("--format", choices=("mp4", "gif", "png"), default=None, help="override the suffix")
    run.add_argument("--fps", type=_argument_type(validate.fps, "fps"), default=8.0,
                     help="frames per second (default 8)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing --out (never the input)")

    sub.add_parser("info", help="versions, devices and usable backends")
    return parser


def _check_output(args) -> None:
    """Fail before any model work: a bad output path is found in milliseconds, not after the denoising."""
    import os

    from .safe_paths import OutputError, check_file_output
    from .video import resolve_format

    fmt = resolve_format(args.out, args.format)
    parent = Path(args.out).resolve().parent
    if not parent.is_dir():
        raise OutputError(f"output folder {str(parent)!r} does not exist; create it or choose another --out")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {str(parent)!r} is not writable; choose another --out")
    check_file_output(args.out, overwrite=args.overwrite, inputs=[args.image], is_folder_output=fmt == "png")
    validate.seed(args.seed or 0, args.segments)


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


def build_request(args) -> Request:
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
    path = write_video(video, args.out, fps=args.fps, format=args.format, overwrite=args.overwrite)
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
    with terminate_as_interrupt():
        try:
            _quiet_libraries()
            return {"run": cmd_run, "info": cmd_info}[args.command](args)
        except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM, also during imports
            log.error("interrupted; no output was written")
            return exit_code_for(interrupt)
        except ValueError as err:  # InputError, CheckpointError, OutputError and the library's validation
            log.error("%s", err, exc_info=args.verbose)
            return EXIT_BAD_INPUT
        except (MemoryError, RuntimeError) as err:
            if not _allocation_failed(err):
                raise
            log.error("out of memory (%s); choose a smaller --height/--width/--frames, or fewer --segments",
                      str(err).splitlines()[0] if str(err) else type(err).__name__)
            return EXIT_BAD_INPUT


def _allocation_failed(err: BaseException) -> bool:
    """MemoryError, torch's CPU allocator ("can't allocate memory") and CUDA's OutOfMemoryError."""
    text = str(err).lower()
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text)


if __name__ == "__main__":
    sys.exit(main())
