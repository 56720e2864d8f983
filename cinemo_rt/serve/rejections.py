"""Refused requests as HTTP answers, each counted by status in `cinemo_http_rejections`: uploads too large
for the limits (refused from their Content-Length), bad requests, a busy store, a full queue."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from .dependencies import server_state
from .jobs import StoreBusy
from .limits import RequestError
from .worker import QueueFull

FORM_OVERHEAD_BYTES = 64 * 1024  # the form fields and multipart boundaries around the image


async def bound_uploads(request: Request, call_next):
    """Refuse an oversized upload from its Content-Length, before the multipart body is read."""
    if request.method == "POST":
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return JSONResponse({"detail": "send a Content-Length header with the upload"}, status_code=411)
        server = server_state(request)
        limits = server.settings.limits
        edit = request.url.path.rstrip("/") == "/v1/edits"
        limit = limits.max_upload_bytes + (limits.max_video_bytes if edit else 0)
        if int(length) > limit + FORM_OVERHEAD_BYTES:
            server.metrics.requests.labels("413").inc()
            what = "video and image limits are" if edit else "image limit is"
            return JSONResponse({"detail": f"the upload is {length} bytes; the {what} {limit} bytes"},
                                status_code=413)
    return await call_next(request)


async def request_error(request: Request, err: RequestError):
    server_state(request).metrics.requests.labels(str(err.status)).inc()
    return JSONResponse({"detail": str(err)}, status_code=err.status)


async def store_busy(request: Request, err: StoreBusy):
    server_state(request).metrics.requests.labels("503").inc()
    return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": "5"})


async def queue_full(request: Request, err: QueueFull):
    server_state(request).metrics.requests.labels("429").inc()
    return JSONResponse({"detail": str(err)}, status_code=429, headers={"Retry-After": str(err.retry_after_s)})


EXCEPTION_HANDLERS = {RequestError: request_error, StoreBusy: store_busy, QueueFull: queue_full}
