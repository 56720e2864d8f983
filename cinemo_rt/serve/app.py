"""The HTTP API (FastAPI): jobs in, status and events out, videos served from the job store.

`create_app(settings)` builds the app; `cinemo-rt serve` runs it under uvicorn and `ray_app.py` wraps the
same app as a Ray Serve ingress. The model runs behind an executor (the local `Worker`, or Ray replicas):
the app only submits job ids, reads progress and asks for cancellation.

This module only assembles the parts: the server state (`state.py`) and the dependencies that read it
(`dependencies.py`), refusals as HTTP answers (`rejections.py`), and the routers: submission
(`routes_submit.py`), the job routes (`routes_jobs.py`), health and facts (`routes_health.py`), the page
(`routes_page.py`).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI

from . import routes_health, routes_jobs, routes_page, routes_submit
from .config import ServeSettings
from .dependencies import refuse_empty_key
from .rejections import EXCEPTION_HANDLERS, bound_uploads
from .runner import Runner
from .state import ServerState

__all__ = ["ServeSettings", "create_app"]  # ServeSettings lives in config.py; callers import both from here

DESCRIPTION = """Animate a still image with Cinemo: submit a job, follow its progress, download the video.

Jobs are stored in SQLite under the server's jobs folder and survive restarts; finished videos expire after
the server's keep time. With `--api-key`, every `/v1` route needs `Authorization: Bearer KEY` (the scheme
in any case; a bare key needs `X-API-Key: KEY`).

`POST /v1/edits` edits a video: upload a clip (mp4, webm, mov or gif) and optionally a new first frame; the
clip's motion moves the new frame (`cinemo-rt edit` over HTTP). Edit jobs share the queue and the job routes
(`/v1/edits/{id}`, its events, video and DELETE, the same as `/v1/animations/{id}`); a job's `kind` says which
it is. Edits run one at a time, un-batched.
"""


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.server.start()
    yield
    app.state.server.stop()


def create_app(settings: ServeSettings, open_runner: Callable[[], Runner] | None = None,
               executor_factory: Callable | None = None) -> FastAPI:
    """`open_runner` replaces loading the model from the settings (tests share one); `executor_factory(store,
    metrics) -> executor` replaces the local worker (Ray uses this)."""
    refuse_empty_key(settings.api_key)
    server = ServerState(settings, open_runner, executor_factory)
    app = FastAPI(title="cinemo-rt", version="1", description=DESCRIPTION, lifespan=lifespan,
                  exception_handlers=EXCEPTION_HANDLERS)
    app.state.server = server
    # the lifespan's start and stop, for hosts that run no lifespan: the Ray ingress, schemathesis (idempotent)
    app.state.start, app.state.stop = server.start, server.stop
    app.middleware("http")(bound_uploads)
    for module in (routes_submit, routes_jobs, routes_health, routes_page):
        app.include_router(module.router)
    app.mount("/static", routes_page.static_files(), name="static")
    return app
