"""`cinemo-rt run`, `cinemo-rt edit`, `cinemo-rt info` and `cinemo-rt serve`.

Exit codes: 0 success, 1 an unexpected failure (with traceback), 2 bad input or configuration (one clear
message, no traceback), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM; cleaned up the same way).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from . import scale, validate
from .backends.registry import BACKENDS, CHOICES
from .interrupts import EXIT_INTERRUPTED, EXIT_TERMINATED, exit_code_for, terminate_as_interrupt
from .request import FIELD_HELP, EditRequest, Request, field_types, parse_text
from .threads import ENV_VAR

log = logging.getLogger("cinemo_rt")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED",
           "EXIT_TERMINATED"]


def _argument_type(check, name: str):
    """A `validate` check as an argparse type: its message becomes argparse's one-line error (exit 2)."""
    def convert(value: str):
        try:
            return check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = name  # argparse names the type in "invalid <name> value" messages
    return convert


def _scale_factor(value: str) -> int:
    try:
        return scale.OutputScale(int(value)).factor
    except ValueError as err:
        raise ValueError(f"--scale must be a whole number in 1..{scale.MAX_FACTOR}; got {value!r}") from err


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where they say something: not None or empty, nor where the help names its default."""

    def _get_help_string(self, action):
        if action.default is None or action.default == "" or isinstance(action.default, bool) \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """`-v` after the subcommand too (`cinemo-rt run ... -v`); SUPPRESS keeps a `-v` given before it."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, with start-up time per phase (also accepted before the subcommand)")


def _add_request_flags(parser: argparse.ArgumentParser, kind: type[Request] | type[EditRequest]) -> None:
    """One flag per field of the request (`--negative-prompt` for `negative_prompt`), its help the field's
    (`request.FIELD_HELP`): the flags only turn text into numbers; the request checks the values, as it
    does for every entry point."""
    group = parser.add_argument_group(f"what to generate (the fields of cinemo_rt.{kind.__name__})")
    for item in dataclasses.fields(kind):
        name, value_type = item.name, field_types(kind)[item.name]
        flag, help = "--" + name.replace("_", "-"), FIELD_HELP[name]
        if name == "use_dct":
            group.add_argument("--no-dct", dest=name, action="store_false", help="plain initial latents instead of DCTInit")
        elif value_type is bool:
            group.add_argument(flag, action="store_true", help=help)
        else:
            group.add_argument(flag, type=_argument_type(functools.partial(parse_text, kind, name), value_type.__name__),
                               default="auto" if name == "bucket" and kind.measures_motion else item.default,
                               help=help, required=name == "prompt" and kind is Request)


def _add_job_options(parser: argparse.ArgumentParser, out: str) -> None:
    """The flags `run` and `edit` share beyond the request: model source, output and threads."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="checkpoint folder in the released layout")
    source.add_argument("--engines", default=None, help="folder built by `python -m export.build_engines`")
    parser.add_argument("--backend", choices=CHOICES, default="auto",
                        help="auto: the reference for a checkpoint; TensorRT, else ONNX Runtime, for --engines; "
                             + "; ".join(f"{e.name}: {e.summary} ({e.source})" for e in BACKENDS.values()))
    parser.add_argument("--device", type=_argument_type(validate.device_name, "device"), default=None,
                        help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                        help="PyTorch backend precision (default fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--out", default=out, help="output .mp4, .gif, or a folder for PNG frames")
    parser.add_argument("--format", choices=("mp4", "gif", "png"), default=None, help="override the suffix")
    parser.add_argument("--fps", type=_argument_type(validate.fps, "fps"), default=8.0, help="frames per second")
    parser.add_argument("--scale", type=_argument_type(_scale_factor, "scale"), default=1, help=scale.HELP)
    parser.add_argument("--scale-filter", choices=scale.FILTERS, default=scale.OutputScale.filter,
                        help=scale.FILTER_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an input)")
    _add_verbose(parser)
    parser.add_argument("--threads", default=None, metavar="N",
                        help=f"CPU threads for PyTorch and ONNX Runtime (None: the {ENV_VAR} variable, else 1 for "
                             "small models and one per available core for large ones)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cinemo-rt", description="Cinemo image animation runtime")
    parser.add_argument("--version", action="version", version=f"cinemo-rt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, with start-up time per phase")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="animate an image", formatter_class=_DefaultsFormatter)
    run.add_argument("--image", required=True, help="input still image (PNG, JPEG, ...)")
    _add_request_flags(run, Request)
    _add_job_options(run, out="cinemo.mp4")

    edit = sub.add_parser("edit", help="move a new first frame the way a video moves (video editing, motion "
                                       "transfer)", formatter_class=_DefaultsFormatter)
    edit.add_argument("--video", required=True,
                      help="source clip: a video file (mp4, webm, mov, gif, ...) or a folder of frames")
    edit.add_argument("--image", default=None,
                      help="the new first frame (None: the clip's own, which reconstructs or re-prompts it)")
    _add_request_flags(edit, EditRequest)
    _add_job_options(edit, out="cinemo_edit.mp4")

    _add_verbose(sub.add_parser("info", help="versions, devices and usable backends"))

    from .serve.command import add_arguments as add_serve_arguments

    serve = sub.add_parser("serve", help="HTTP API and web page (see docs/serving.md)")
    add_serve_arguments(serve)
    _add_verbose(serve)
    return parser


def _check_output(args) -> None:
    """Fail before any model work: a bad output path is found in milliseconds, not after the denoising."""
    import os

    from .safe_paths import OutputError, check_file_output
    from .video import resolve_format

    fmt = resolve_format(args.out, args.format)
    try:
        parent = Path(args.out).resolve().parent
    except (OSError, RuntimeError) as err:  # a symbolic link loop (RuntimeError before Python 3.13)
        raise OutputError(f"--out {args.out!r} cannot be resolved ({err}); choose another output name") from None
    if not parent.is_dir():
        raise OutputError(f"output folder {str(parent)!r} does not exist; create it or choose another --out")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {str(parent)!r} is not writable; choose another --out")
    check_file_output(args.out, overwrite=args.overwrite, inputs=[args.image, getattr(args, "video", None)],
                      is_folder_output=fmt == "png")


@contextmanager
def _phase(phases: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - start


def _open_animator(args, plan):
    from .pipeline import Animator

    if args.engines:
        return Animator.from_engines(plan.folder, backend=args.backend, device=args.device)
    return Animator.from_checkpoint(plan.folder, backend=args.backend, device=args.device, dtype=args.dtype)


def _progress(total: int, desc: str = "denoising"):
    """A bar on a terminal; log lines every 10% otherwise (a redirected run used to be silent for minutes)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", disable=None)
    if not bar.disable:
        return bar, lambda i, t, x: bar.update(1)
    start, done, every = time.perf_counter(), [0], max(1, total // 10)

    def log_step(i, t, x):
        done[0] += 1
        if done[0] % every == 0 or done[0] == total:
            log.info("%s: step %d/%d, %.1f s", desc, done[0], total, time.perf_counter() - start)

    return bar, log_step


def build_request(args, kind: type[Request] | type[EditRequest] = Request) -> Request | EditRequest:
    """The one place the CLI's flags become a request: each request field from its flag."""
    return kind(**{item.name: getattr(args, item.name) for item in dataclasses.fields(kind)})


def cmd_run(args) -> int:
    from .preflight import plan_run
    from .threads import parse_threads

    phases: dict[str, float] = {}
    with _phase(phases, "validate"):
        request = build_request(args, Request)
        _check_output(args)
        threads = parse_threads(args.threads)
        plan = plan_run(args, request)  # image, folder, sizes, memory: before any heavy import
    return _execute(args, plan, threads, phases, request.steps * request.segments, "denoising",
                    lambda animator, callback: animator.run(plan.image, request, callback=callback))


def cmd_edit(args) -> int:
    """As `run`, with the clip read and its frame window chosen before any model loads."""
    from .clip import open_window
    from .preflight import plan_run
    from .threads import parse_threads

    phases: dict[str, float] = {}
    with _phase(phases, "validate"):
        request = build_request(args, EditRequest)
        _check_output(args)
        threads = parse_threads(args.threads)
        plan = plan_run(args, request)  # the new image (optional), folder, sizes, memory
        request = request.resolve(plan.size)
        clip, window = open_window(args.video, request)
    say(f"source clip {args.video}: {window.describe(clip.fps)}"
        + ("" if request.stride else " (the default stride; --stride K to choose)"))

    def job(animator, callback):
        from .pipeline import measured_motion

        measured = measured_motion(clip.frames, request)
        edit = request.measured(window.stride, measured)
        if measured is not None:
            say(f"motion bucket {edit.bucket} measured on the clip (--bucket auto)" if edit.bucket is not None
                else f"motion id {edit.motion_id:g} measured on the clip (--bucket auto)")
        return animator.run_edit(clip.frames, plan.image, edit, callback=callback)

    return _execute(args, plan, threads, phases, 2 * request.steps * request.segments, "inverting + denoising", job)


def _execute(args, plan, threads, phases: dict[str, float], total_steps: int, desc: str, job) -> int:
    """The part of `run` and `edit` after validation: imports, the model, `job(animator, callback)` under a
    progress bar, the video written, timings logged."""
    with _phase(phases, "import torch"):
        import torch  # noqa: F401  (timed here, not inside the first stage that needs it)
    with _phase(phases, "import libraries"):
        from .pipeline import Animator  # noqa: F401
        from .threads import apply_threads
        from .video import write_video

        _quiet_libraries()
        if not args.engines:  # the checkpoint's modules and the tokenizer's extension: imports, not model loading
            from .checkpoint import import_component_libraries

            import_component_libraries()
    with _phase(phases, "load model"):
        apply_threads(plan.parameters, threads)
        animator = _open_animator(args, plan)
        animator.log_warnings = False  # the validation logged the prompt's warnings already
    log.info("backend: %s on %s (%s)", animator.backend.name, animator.backend.device,
             str(animator.backend.dtype).removeprefix("torch."))
    log.debug("start-up: %s", ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items()))
    bar, callback = _progress(total_steps, desc)
    with bar:
        video = job(animator, callback)
    with _phase(phases, "write"):
        path = write_video(video, args.out, fps=args.fps, format=args.format, overwrite=args.overwrite,
                           scale=args.scale)
    for stage, seconds in animator.last_timings.items():
        log.info("  %-18s %8.3f s", stage, seconds)
    log.info("  %-18s %8.3f s", "total", sum(animator.last_timings.values()))
    log.info("UNet calls: %d (single-image; a CFG call counts 2)", animator.last_unet_calls)
    log.debug("write: %.2f s", phases["write"])
    height, width = args.scale.size(*video.shape[1:3])
    scaled = f", scaled {args.scale.factor}x ({args.scale.filter})" if args.scale.factor > 1 else ""
    say(f"wrote {video.shape[0]} frames of {height}x{width} (height x width{scaled}) to {path}")
    return EXIT_OK


def say(line: str) -> None:
    """One result line on stdout. A closed pipe (`| head`) or a full device (`>/dev/full`) must not turn a
    finished run into a traceback: the line goes to the log instead, and stdout is dropped for the rest."""
    import os

    try:
        print(line, flush=True)
    except OSError as err:  # BrokenPipeError, ENOSPC
        sys.stdout = open(os.devnull, "w")  # nothing left to flush at exit
        log.warning("stdout is closed or full (%s); %s", err.strerror or type(err).__name__, line)


def cmd_info(args) -> int:
    from .backends.registry import backend_report

    _quiet_libraries()
    for line in backend_report():
        print(line)
    return EXIT_OK


def cmd_serve(args) -> int:
    from .serve.command import serve

    return serve(args)


def _quiet_libraries() -> None:
    """diffusers/transformers keep their own verbosity; their advice is not for our users. Only where something
    imported them already (training, a test's fixtures): running a checkpoint needs neither, and importing
    them here would cost seconds."""
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()


def _user_error_types() -> tuple[type, ...]:
    """The library's bad-input errors, from the modules already imported: the handler must not import torch
    to report an argument error (an error of a module not imported cannot have been raised)."""
    names = {"cinemo_rt.image": "InputError", "cinemo_rt.checkpoint": "CheckpointError",
             "cinemo_rt.safe_paths": "OutputError", "cinemo_rt.limits": "LimitError",
             "cinemo_rt.files": "FileFormatError", "cinemo_rt.serve.jobs": "StorageError"}
    return tuple(getattr(sys.modules[module], name) for module, name in names.items() if module in sys.modules)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if hasattr(args, "scale_filter"):  # the two flags become one `OutputScale`, as every entry point's
        args.scale = scale.OutputScale(args.scale, args.scale_filter)
    return args


def main(argv: list[str] | None = None) -> int:
    import os

    from .threads import parse_threads

    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:  # the environment is checked as the flags are, before any import or work
        parse_threads(os.environ.get(ENV_VAR), ENV_VAR)
        parse_threads(getattr(args, "threads", None))
    except ValueError as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    with terminate_as_interrupt():
        try:
            return {"run": cmd_run, "edit": cmd_edit, "info": cmd_info, "serve": cmd_serve}[args.command](args)
        except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM, also during imports
            log.error("interrupted; no output was written")
            return exit_code_for(interrupt)
        except ValueError as err:  # InputError, CheckpointError, OutputError and the library's validation
            log.error("%s", err, exc_info=args.verbose and not isinstance(err, _user_error_types()))
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
