"""Health and facts: /healthz (the process is up), /readyz (the model is loaded), /v1/model, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, PlainTextResponse

from .dependencies import AUTHORIZED, Server

router = APIRouter()
# No docstrings on the handlers: FastAPI would publish them as the operations' descriptions.


@router.get("/healthz", summary="The process is up")
def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="The model is loaded and the worker accepts jobs")
def readyz(server: Server):
    executor = server.executor
    alive = getattr(executor, "is_alive", lambda: True)()
    if executor.ready.is_set() and alive:
        return {"status": "ready"}
    reason = executor.load_error or ("loading the model" if alive else "the worker stopped; see the log")
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)


@router.get("/v1/model", dependencies=AUTHORIZED,
            summary="What the model can do: its video size and frames, parameters, closed vocabulary, training")
def model(server: Server):
    executor = server.executor
    if not executor.ready.is_set():
        raise HTTPException(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
    return executor.facts.as_dict()


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
def metrics(server: Server):
    return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")
