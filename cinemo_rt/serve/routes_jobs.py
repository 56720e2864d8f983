"""The job routes: status, progress events, the video and DELETE, the same under /v1/animations/{id} and
/v1/edits/{id} (any job id works under either; a job's `kind` says which it is)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, StreamingResponse

from .dependencies import AUTHORIZED, FoundJob, Server
from .job_view import COLLECTIONS, describe
from .jobs import FINAL_STATES, RUNNING
from .limits import MEDIA_TYPES

EVENT_POLL_S = 0.1
# No docstrings on the handlers: FastAPI would publish them as the operations' descriptions.


def status(job: FoundJob, server: Server):
    return describe(job, server.executor)


async def events(job: FoundJob, server: Server):
    async def stream():
        last = None
        while True:
            current = server.store.get(job.id)
            body = describe(current, server.executor) if current else {"id": job.id, "state": "deleted"}
            text = json.dumps(body)
            if text != last:
                yield f"event: status\ndata: {text}\n\n"
                last = text
            if current is None or current.state in FINAL_STATES:
                return
            await asyncio.sleep(EVENT_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def video(job: FoundJob, server: Server):
    path = server.store.video_path(job)
    if job.state != "done" or not path.is_file():
        raise HTTPException(409, f"job {job.id} is {job.state}; the video exists once it is done")
    return FileResponse(path, media_type=MEDIA_TYPES[job.format], filename=f"cinemo-{job.id}.{job.format}")


def delete(job: FoundJob, server: Server):
    if job.state in FINAL_STATES:
        server.store.delete(job.id)
        return {"id": job.id, "state": "deleted"}
    server.executor.cancel(job.id)
    return {"id": job.id, "state": "cancelling" if job.state == RUNNING else "cancelled"}


def _job_router() -> APIRouter:
    router = APIRouter(dependencies=AUTHORIZED)
    for collection in COLLECTIONS.values():
        base = f"/v1/{collection}/{{job_id}}"
        for path, method, endpoint, summary in (
                (base, "GET", status, "Job status"),
                (f"{base}/events", "GET", events,
                 "Progress as server-sent events (one JSON status per change, ends at a final state)"),
                (f"{base}/video", "GET", video, "The finished video"),
                (base, "DELETE", delete, "Cancel queued or running work (between steps) and delete its results")):
            router.add_api_route(path, endpoint, methods=[method], summary=summary,
                                 name=f"{endpoint.__name__}_{collection}")
    return router


router = _job_router()
