"""The HTTP API (FastAPI): jobs in, status and events out, videos served from the job store.

`create_app(settings)` builds the app; `cinemo-rt serve` runs it under uvicorn and `ray_app.py` wraps the
same app as a Ray Serve ingress. The model runs behind an executor (the local `Worker`, or Ray replicas):
the app only submits job ids, reads progress and asks for cancellation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import tempfile
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, UploadFile
from fastapi import Request as HttpRequest
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from ..errors import InputError
from ..files import give_default_mode
from ..pipeline import measured_motion
from ..request import EditRequest, Request
from ..scale import OutputScale
from .batching import BatchPolicy
from .jobs import (DONE, EDIT, FINAL_STATES, QUEUED, RUNNING, JobStore, StoreBusy, is_job_id, new_job_id,
                   started_in_process)
from .forms import AnimationForm, EditForm, split_form
from .limits import (MEDIA_TYPES, Limits, RequestError, build_request, check_clip, check_format, check_scale,
                     job_sizer, read_upload, save_clip_upload)
from .metrics import Metrics
from .runner import Runner
from .worker import QueueFull, Worker

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "page"
EVENT_POLL_S = 0.1
FORM_OVERHEAD_BYTES = 64 * 1024  # the form fields and multipart boundaries around the image
COLLECTIONS = {"animation": "animations", EDIT: "edits"}  # job kind -> its URL prefix under /v1

DESCRIPTION = """Animate a still image with Cinemo: submit a job, follow its progress, download the video.

Jobs are stored in SQLite under the server's jobs folder and survive restarts; finished videos expire after
the server's keep time. With `--api-key`, every `/v1` route needs `Authorization: Bearer KEY` (the scheme
in any case; a bare key needs `X-API-Key: KEY`).

`POST /v1/edits` edits a video: upload a clip (mp4, webm, mov or gif) and optionally a new first frame; the
clip's motion moves the new frame (`cinemo-rt edit` over HTTP). Edit jobs share the queue and the job routes
(`/v1/edits/{id}`, its events, video and DELETE, the same as `/v1/animations/{id}`); a job's `kind` says which
it is. Edits run one at a time, un-batched.
"""


@dataclass(frozen=True)
class ServeSettings:
    jobs_dir: Path = Path("cinemo-jobs")
    checkpoint: str | None = None
    engines: str | None = None
    device: str | None = None
    dtype: str | None = None
    api_key: str | None = None
    max_queue: int = 32
    policy: BatchPolicy = field(default_factory=BatchPolicy)
    limits: Limits = field(default_factory=Limits)
    keep_s: float = 24 * 3600.0   # finished jobs and their videos are deleted after this
    requeue: bool = False         # after a restart, run interrupted jobs again instead of failing them
    exact_batching: bool = False  # True: batched videos bit-equal to running alone (fixed UNet rows; runner.py)
    threads: int | None = None    # CPU threads (None: the CLI's policy, cinemo_rt/threads.py)

    def open_runner(self) -> Runner:
        return Runner.open(self.checkpoint, self.engines, self.device, self.dtype, self.policy.max_batch,
                           self.exact_batching, self.threads)


def _key_checker(api_key: str | None) -> Callable:
    """`Authorization: Bearer KEY` (the scheme in any case, RFC 7235) or `X-API-Key: KEY`; a bare key in
    `Authorization` has no scheme and is refused. Keys compare as UTF-8 bytes: HTTP headers arrive decoded
    as Latin-1, so a header is turned back into the bytes the client sent before comparing."""
    if api_key is not None and not api_key.strip():  # every request would match it: authentication off
        raise ValueError("the API key is empty; give a key, or None to serve without one")
    expected = api_key.encode("utf-8") if api_key is not None else None

    def given_key(authorization: str | None, x_api_key: str | None) -> bytes:
        if x_api_key:
            return x_api_key.strip().encode("latin-1", "replace")
        scheme, _, token = (authorization or "").strip().partition(" ")
        return token.strip().encode("latin-1", "replace") if scheme.lower() == "bearer" else b""

    def require_key(authorization: Annotated[str | None, Header()] = None,
                    x_api_key: Annotated[str | None, Header()] = None) -> None:
        if expected is None:
            return
        # compare_digest takes time independent of where the strings differ
        if not hmac.compare_digest(given_key(authorization, x_api_key), expected):
            raise HTTPException(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    return require_key


def _save_png_atomically(image, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as handle:
            Image.fromarray(image).save(handle, format="PNG")
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_app(settings: ServeSettings, open_runner: Callable[[], Runner] | None = None,
               executor_factory: Callable | None = None) -> FastAPI:
    """`open_runner` replaces loading the model from the settings (tests share one); `executor_factory(store,
    metrics) -> executor` replaces the local worker (Ray uses this)."""
    state: dict = {}
    key = str(Path(settings.jobs_dir).resolve())

    def make_local_worker(store: JobStore, metrics: Metrics) -> Worker:
        return Worker(store, open_runner or settings.open_runner, settings.policy, settings.max_queue, metrics)

    def start() -> None:
        """Open the store, settle jobs a previous run left behind, start the executor and the expiry sweep.
        Idempotent: the lifespan calls it, and so does a Ray Serve ingress (which may not run lifespans). Ray
        unpickles the app twice in the ingress process (the ASGI app and the ingress's own reference): the
        second copy adopts the first's store and executor, since the process owns the folder once."""
        started, lock = started_in_process()
        with lock:
            if state:
                return
            running = started.get(key)
            if running is not None:
                state.update(running)
                return
            _start()
            started[key] = state

    def _start() -> None:
        store = JobStore(settings.jobs_dir, owner=True)
        try:
            requeued = store.recover(requeue=settings.requeue)
            store.expire(settings.keep_s)
            metrics = Metrics(lambda: state["executor"].queue_length(), store.counts)
            executor = (executor_factory or make_local_worker)(store, metrics)
        except BaseException:
            store.close()  # the folder's lock goes with it: a retried start can take it
            raise
        stop_sweep = threading.Event()
        state.update(store=store, metrics=metrics, executor=executor, stop_sweep=stop_sweep)
        executor.start(requeued)
        threading.Thread(target=_sweep, args=(store, settings.keep_s, stop_sweep), daemon=True).start()

    def stop() -> None:
        started, lock = started_in_process()
        with lock:
            if not state:
                return
            if started.get(key) is not state:  # a copy that adopted the running one: the owner stops it
                state.clear()
                return
            del started[key]
        state["stop_sweep"].set()
        state["executor"].stop()
        state["store"].close()
        state.clear()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        start()
        yield
        stop()

    app = FastAPI(title="cinemo-rt", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.serve, app.state.start, app.state.stop = state, start, stop
    authorized = [Depends(_key_checker(settings.api_key))]
    sizing = job_sizer(settings.checkpoint, settings.engines, settings.dtype, settings.device)

    @app.middleware("http")
    async def bound_uploads(request: HttpRequest, call_next):
        """Refuse an oversized upload from its Content-Length, before the multipart body is read."""
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "send a Content-Length header with the upload"}, status_code=411)
            limits = settings.limits
            edit = request.url.path.rstrip("/") == "/v1/edits"
            limit = limits.max_upload_bytes + (limits.max_video_bytes if edit else 0)
            if int(length) > limit + FORM_OVERHEAD_BYTES:
                state["metrics"].requests.labels("413").inc()
                what = "video and image limits are" if edit else "image limit is"
                return JSONResponse({"detail": f"the upload is {length} bytes; the {what} {limit} bytes"},
                                    status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def request_error(request: HttpRequest, err: RequestError):
        state["metrics"].requests.labels(str(err.status)).inc()
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(StoreBusy)
    async def store_busy(request: HttpRequest, err: StoreBusy):
        state["metrics"].requests.labels("503").inc()
        return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(QueueFull)
    async def queue_full(request: HttpRequest, err: QueueFull):
        state["metrics"].requests.labels("429").inc()
        return JSONResponse({"detail": str(err)}, status_code=429,
                            headers={"Retry-After": str(err.retry_after_s)})

    def job_or_404(job_id: str):
        job = state["store"].get(job_id) if is_job_id(job_id) else None
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}: unknown, deleted, or expired")
        return job

    def describe(job) -> dict:
        executor = state["executor"]
        base = f"/v1/{COLLECTIONS[job.kind]}/{job.id}"
        body = {"id": job.id, "kind": job.kind, "state": job.state, "created": job.created, "started": job.started,
                "finished": job.finished, "request": job.request,
                "urls": {"status": base, "events": f"{base}/events", "video": f"{base}/video"}}
        if job.state == QUEUED:
            body["position"] = executor.position(job.id)
        if job.state == RUNNING:  # an edit's steps count inversion and sampling (its total is set when it starts)
            body.update(step=job.step, total=job.total or job.request["steps"] * job.request["segments"])
        if job.state in (RUNNING, DONE):
            body["unet_calls"] = job.calls  # single-image UNet calls so far (a CFG step counts 2)
        facts = getattr(executor, "facts", None) if executor.ready.is_set() else None
        if facts is not None:  # what the model cannot read in the prompt (empty, words outside its vocabulary)
            body["warnings"] = facts.prompt_warnings(job.request["prompt"], job.request.get("negative_prompt", ""))
        if job.error:
            body["error"] = job.error
        return body

    @app.post("/v1/animations", status_code=202, dependencies=authorized,
              summary="Submit an image to animate; returns the job id and its URLs")
    def submit(image: Annotated[UploadFile, File(description="the still image, PNG or JPEG")],
               form: Annotated[AnimationForm, Form()]):
        executor, store = state["executor"], state["store"]
        ready_with_room(executor)
        fields, output = split_form(form)
        check_format(output["format"])
        # stored resolved (sizes, seed, the fast preset's values): the request reproduces the video
        request = build_request(Request, fields, executor.defaults, sizing)
        scale = check_scale(output["scale"], output["scale_filter"], request)
        pixels = read_upload(image.file.read(settings.limits.max_upload_bytes + 1), settings.limits)
        job_id = new_job_id()
        try:  # an input is kept only with its job: no orphan upload when the database refuses the job
            _save_png_atomically(pixels, store.input_path(job_id))
            return enqueue(job_id, {**request.as_dict(), "format": output["format"], **_scale_fields(scale)})
        except BaseException:
            store.remove_inputs(job_id)
            raise

    def ready_with_room(executor) -> None:
        if not getattr(executor, "is_alive", lambda: True)():
            raise HTTPException(503, "the worker stopped (see the server's log); jobs cannot run until the server "
                                     "is restarted", headers={"Retry-After": "30"})
        if not executor.ready.is_set():
            raise HTTPException(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
        executor.check_capacity()

    def enqueue(job_id: str, request: dict) -> JSONResponse:
        store = state["store"]
        job = store.add(job_id, request)
        try:
            state["executor"].submit(job_id)
        except QueueFull:
            store.delete(job_id)
            raise
        body = describe(job)
        return JSONResponse(body, status_code=202, headers={"Location": body["urls"]["status"]})

    @app.post("/v1/edits", status_code=202, dependencies=authorized,
              summary="Submit a video to edit (its motion moves a new first frame); returns the job id and URLs")
    def submit_edit(video: Annotated[UploadFile, File(description="the source clip: mp4, webm, mov or gif")],
                    form: Annotated[EditForm, Form()],
                    image: Annotated[UploadFile | None, File(description="the new first frame, PNG or JPEG; "
                                                             "absent: the clip's own (reconstruction)")] = None):
        executor, store = state["executor"], state["store"]
        ready_with_room(executor)
        try:
            fields, output = split_form(form)
        except InputError as err:
            raise RequestError(422, str(err)) from err
        check_format(output["format"])
        request = build_request(EditRequest, fields, executor.defaults, sizing)
        scale = check_scale(output["scale"], output["scale_filter"], request)
        pixels = None
        if image is not None and image.filename:
            pixels = read_upload(image.file.read(settings.limits.max_upload_bytes + 1), settings.limits)
        job_id = new_job_id()
        clip_path = store.clip_path(job_id)
        save_clip_upload(video.file, clip_path, settings.limits)
        try:
            clip, window = check_clip(clip_path, request)
            # the stride and a measured bucket stored, as the CLI prints them
            request = request.measured(window.stride, measured_motion(clip.frames, request))
            if pixels is not None:
                _save_png_atomically(pixels, store.input_path(job_id))
            return enqueue(job_id, {**request.as_dict(), "format": output["format"], "kind": EDIT,
                                    **_scale_fields(scale)})
        except BaseException:
            store.remove_inputs(job_id)
            raise

    def status(job_id: str):
        return describe(job_or_404(job_id))

    async def events(job_id: str):
        job_or_404(job_id)

        async def stream():
            last = None
            while True:
                job = state["store"].get(job_id)
                body = describe(job) if job else {"id": job_id, "state": "deleted"}
                text = json.dumps(body)
                if text != last:
                    yield f"event: status\ndata: {text}\n\n"
                    last = text
                if job is None or job.state in FINAL_STATES:
                    return
                await asyncio.sleep(EVENT_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def video(job_id: str):
        job = job_or_404(job_id)
        path = state["store"].video_path(job)
        if job.state != "done" or not path.is_file():
            raise HTTPException(409, f"job {job_id} is {job.state}; the video exists once it is done")
        return FileResponse(path, media_type=MEDIA_TYPES[job.format], filename=f"cinemo-{job_id}.{job.format}")

    def delete(job_id: str):
        job = job_or_404(job_id)
        if job.state in FINAL_STATES:
            state["store"].delete(job_id)
            return {"id": job_id, "state": "deleted"}
        state["executor"].cancel(job_id)
        return {"id": job_id, "state": "cancelling" if job.state == RUNNING else "cancelled"}

    # the job routes, the same under both kinds' prefixes (any job id works under either)
    for collection in COLLECTIONS.values():
        base = f"/v1/{collection}/{{job_id}}"
        for path, method, endpoint, summary in (
                (base, "GET", status, "Job status"),
                (f"{base}/events", "GET", events,
                 "Progress as server-sent events (one JSON status per change, ends at a final state)"),
                (f"{base}/video", "GET", video, "The finished video"),
                (base, "DELETE", delete, "Cancel queued or running work (between steps) and delete its results")):
            app.add_api_route(path, endpoint, methods=[method], dependencies=authorized, summary=summary,
                              name=f"{endpoint.__name__}_{collection}")

    @app.get("/healthz", summary="The process is up")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and the worker accepts jobs")
    def readyz():
        executor = state["executor"]
        alive = getattr(executor, "is_alive", lambda: True)()
        if executor.ready.is_set() and alive:
            return {"status": "ready"}
        reason = executor.load_error or ("loading the model" if alive else "the worker stopped; see the log")
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/v1/model", dependencies=authorized,
             summary="What the model can do: its video size and frames, parameters, closed vocabulary, training")
    def model():
        executor = state["executor"]
        if not executor.ready.is_set():
            raise HTTPException(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
        return executor.facts.as_dict()

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics():
        return PlainTextResponse(state["metrics"].render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(PAGE / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():  # browsers ask for it whatever the page says; a 404 there is a console error
        return FileResponse(PAGE / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=PAGE), name="static")
    return app


def _scale_fields(scale: OutputScale) -> dict:
    """The output scale as the stored job request names it (the worker reads it back when writing)."""
    return {"scale": scale.factor, "scale_filter": scale.filter}


def _sweep(store: JobStore, keep_s: float, stop: threading.Event) -> None:
    interval = max(1.0, min(60.0, keep_s / 4))
    while not stop.wait(interval):
        try:
            if removed := store.expire(keep_s):
                log.info("expired %d finished jobs", removed)
        except Exception:  # noqa: BLE001 - the next sweep tries again
            log.exception("expiring old jobs failed")
