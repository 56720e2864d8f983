"""`cinemo-rt serve`: arguments and start-up (uvicorn), imported only when the subcommand runs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# The server's option ranges, checked before it starts (`check_options`): past them a value is a typo (a wait of
# 1e300 ms overflowed the worker's timer and stopped it while /readyz said ready).
MAX_QUEUE = 100_000
MAX_BATCH = 256
MAX_WAIT_MS = 60_000.0
MAX_KEEP_HOURS = 24 * 365 * 10


OPTION_RANGES = {"port": (1, 65535), "max_queue": (1, MAX_QUEUE), "max_batch": (1, MAX_BATCH),
                 "max_wait_ms": (0, MAX_WAIT_MS), "keep_hours": (1 / 3600, MAX_KEEP_HOURS), "replicas": (1, MAX_BATCH)}


def check_options(args) -> None:
    """Every numeric option within its range (NaN and infinities fail the comparison too): one message
    naming the option and the range, exit 2, before anything starts."""
    from ..image import InputError

    for name, (low, high) in OPTION_RANGES.items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            raise InputError(f"--{name.replace('_', '-')} must be in {low:g}..{high:g}; got {value}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the embedded demo)")
    source.add_argument("--engines", default=None, help="folder built by `python -m export.build_engines`")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None)
    parser.add_argument("--threads", default=None, metavar="N",
                        help="CPU threads for PyTorch (default: as `cinemo-rt run`, see --threads there)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--jobs", default="cinemo-jobs", help="folder for the job database, inputs and videos")
    parser.add_argument("--api-key", default=None,
                        help="require this key on /v1 routes (or set CINEMO_API_KEY; keeps it out of `ps`)")
    parser.add_argument("--max-queue", type=int, default=32,
                        help="queued jobs before 429 (default 32)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="requests per UNet call; 1 = no batching (default: 4 on a GPU, 1 on a CPU, where "
                             "a UNet call's cost grows with its rows and batching does not pay: "
                             "benchmarks/results/serving.md)")
    parser.add_argument("--max-wait-ms", type=float, default=50.0,
                        help="how long an idle worker waits for companions to batch with (default 50)")
    parser.add_argument("--exact-batching", dest="exact_batching", action="store_true", default=False,
                        help="pad every UNet call to 2 x --max-batch rows, so a batched video is bit for bit the "
                             "same request's alone; a lone request then computes --max-batch times its rows "
                             "(default: pad to the next power of two only; videos within 2 levels of 255)")
    parser.add_argument("--no-exact-batching", dest="exact_batching", action="store_false",
                        help=argparse.SUPPRESS)  # the default now; kept so that older scripts still run
    parser.add_argument("--keep-hours", type=float, default=24.0, help="finished jobs expire after this")
    parser.add_argument("--requeue", action="store_true",
                        help="after a restart, run interrupted jobs again (default: mark them failed)")
    parser.add_argument("--ray", action="store_true",
                        help="run as a Ray Serve application (see cinemo_rt/serve/ray_app.py; joins RAY_ADDRESS)")
    parser.add_argument("--replicas", type=int, default=2,
                        help="with --ray: model replicas (default 2)")


def default_max_batch(device: str | None) -> int:
    import torch

    on_gpu = device.startswith("cuda") if device else torch.cuda.is_available()
    return 4 if on_gpu else 1


def settings_from_args(args):
    import os

    from ..threads import parse_threads
    from .app import ServeSettings
    from .batching import BatchPolicy
    from .keys import api_key

    if args.max_batch is None:
        args.max_batch = default_max_batch(args.device)
        log.info("batching up to %d request(s) per UNet call (--max-batch)", args.max_batch)

    return ServeSettings(jobs_dir=Path(args.jobs), checkpoint=args.checkpoint, engines=args.engines,
                         device=args.device, dtype=args.dtype, api_key=api_key(args.api_key, os.environ),
                         max_queue=args.max_queue, policy=BatchPolicy(args.max_batch, args.max_wait_ms),
                         keep_s=args.keep_hours * 3600, requeue=args.requeue,
                         exact_batching=args.exact_batching, threads=parse_threads(args.threads))


def serve(args) -> int:
    check_options(args)
    settings = settings_from_args(args)
    if args.ray:
        from .ray_app import run_ray

        return run_ray(settings, args.host, args.port, args.replicas)
    import uvicorn

    from .app import create_app
    from .jobs import JobStore

    # The jobs folder is checked (and its lock tried) before uvicorn starts: a broken or taken folder is one
    # message and exit 2, not a traceback from the server's start-up.
    JobStore(settings.jobs_dir, owner=True).close()
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can submit jobs",
                    args.host)
    log.info("serving on http://%s:%d (jobs in %s); the page is at /, the API at /docs",
             args.host, args.port, settings.jobs_dir)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=args.host, port=args.port, log_level="info"))
    server.run()
    if not server.started:  # the lifespan or the socket failed: uvicorn has logged why
        log.error("the server could not start on %s:%d (see the lines above)", args.host, args.port)
        return 1
    return 0
