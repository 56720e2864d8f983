"""FastAPI dependencies over the server state: the state itself, the API key check and the job a route names."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from .jobs import Job, is_job_id
from .state import ServerState


def server_state(request: Request) -> ServerState:
    return request.app.state.server


Server = Annotated[ServerState, Depends(server_state)]


def refuse_empty_key(api_key: str | None) -> None:
    if api_key is not None and not api_key.strip():  # every request would match it: authentication off
        raise ValueError("the API key is empty; give a key, or None to serve without one")


def _given_key(authorization: str | None, x_api_key: str | None) -> bytes:
    if x_api_key:
        return x_api_key.strip().encode("latin-1", "replace")
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip().encode("latin-1", "replace") if scheme.lower() == "bearer" else b""


def require_key(server: Server, authorization: Annotated[str | None, Header()] = None,
                x_api_key: Annotated[str | None, Header()] = None) -> None:
    """`Authorization: Bearer KEY` (the scheme in any case, RFC 7235) or `X-API-Key: KEY`; a bare key in
    `Authorization` has no scheme and is refused. Keys compare as UTF-8 bytes: HTTP headers arrive decoded
    as Latin-1, so a header is turned back into the bytes the client sent before comparing."""
    api_key = server.settings.api_key
    if api_key is None:
        return
    # compare_digest takes time independent of where the strings differ
    if not hmac.compare_digest(_given_key(authorization, x_api_key), api_key.encode("utf-8")):
        raise HTTPException(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                            headers={"WWW-Authenticate": "Bearer"})


AUTHORIZED = [Depends(require_key)]  # the dependencies of every /v1 route


def job_or_404(job_id: str, server: Server) -> Job:
    job = server.store.get(job_id) if is_job_id(job_id) else None
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}: unknown, deleted, or expired")
    return job


FoundJob = Annotated[Job, Depends(job_or_404)]
