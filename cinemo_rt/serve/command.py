"""`cinemo-rt serve`: arguments and start-up (uvicorn), imported only when the subcommand runs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


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
    parser.add_argument("--max-queue", type=int, default=32, help="queued jobs before 429 (default 32)")
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
    parser.add_argument("--replicas", type=int, default=2, help="with --ray: model replicas (default 2)")


def default_max_batch(device: str | None) -> int:
    import torch

    on_gpu = device.startswith("cuda") if device else torch.cuda.is_available()
    return 4 if on_gpu else 1


def settings_from_args(args):
    import os

    from ..threads import parse_threads
    from .app import ServeSettings
    from .batching import BatchPolicy

    if args.max_batch is None:
        args.max_batch = default_max_batch(args.device)
        log.info("batching up to %d request(s) per UNet call (--max-batch)", args.max_batch)

    return ServeSettings(jobs_dir=Path(args.jobs), checkpoint=args.checkpoint, engines=args.engines,
                         device=args.device, dtype=args.dtype,
                         api_key=args.api_key or os.environ.get("CINEMO_API_KEY") or None,
                         max_queue=args.max_queue, policy=BatchPolicy(args.max_batch, args.max_wait_ms),
                         keep_s=args.keep_hours * 3600, requeue=args.requeue,
                         exact_batching=args.exact_batching, threads=parse_threads(args.threads))


def serve(args) -> int:
    from ..image import InputError

    if (args.max_queue < 1 or (args.max_batch is not None and args.max_batch < 1) or args.max_wait_ms < 0
            or args.keep_hours <= 0):
        raise InputError("--max-queue and --max-batch must be at least 1, --max-wait-ms at least 0, "
                         "--keep-hours above 0")
    settings = settings_from_args(args)
    if args.ray:
        from .ray_app import run_ray

        return run_ray(settings, args.host, args.port, args.replicas)
    import uvicorn

    from .app import create_app

    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can submit jobs",
                    args.host)
    log.info("serving on http://%s:%d (jobs in %s); the page is at /, the API at /docs",
             args.host, args.port, settings.jobs_dir)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0
