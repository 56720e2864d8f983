"""Job submission: POST /v1/animations (an image to animate) and POST /v1/edits (a clip to edit).

Each handler builds the request from its form (`forms.py`: the request's own fields) and checks it the way
the CLI does, saves the upload beside the job and hands the job id
to the executor; the answer is the job as `GET` shows it, with a `Location` header.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image

from ..errors import InputError
from ..files import give_default_mode
from ..pipeline import measured_motion
from ..request import EditRequest, Request
from ..scale import OutputScale
from .dependencies import AUTHORIZED, Server
from .job_view import describe
from .jobs import EDIT, new_job_id
from .forms import AnimationForm, EditForm, KnownFieldsOnly, split_form
from .limits import (RequestError, build_request, check_clip, check_format, check_scale, read_upload,
                     save_clip_upload)
from .state import ServerState
from .worker import QueueFull

router = APIRouter()
# No docstrings on the handlers: FastAPI would publish them as the operations' descriptions.


@router.post("/v1/animations", status_code=202,
             dependencies=[*AUTHORIZED, Depends(KnownFieldsOnly(Request, files=("image",)))],
             summary="Submit an image to animate; returns the job id and its URLs")
def submit(server: Server, image: Annotated[UploadFile, File(description="the still image, PNG or JPEG")],
           form: Annotated[AnimationForm, Form()]):
    executor, store, settings = server.executor, server.store, server.settings
    ready_with_room(executor)
    fields, output = split_form(form)
    check_format(output["format"])
    # stored resolved (sizes, seed, the fast preset's values filled in): the request reproduces the video
    request = build_request(Request, fields, executor.defaults, server.sizing)
    scale = check_scale(output["scale"], output["scale_filter"], request)
    pixels = read_upload(image.file.read(settings.limits.max_upload_bytes + 1), settings.limits)
    job_id = new_job_id()
    try:  # an input is kept only with its job: no orphan upload when the database refuses the job
        _save_png_atomically(pixels, store.input_path(job_id))
        return enqueue(server, job_id, {**request.as_dict(), "format": output["format"], **_scale_fields(scale)})
    except BaseException:
        store.remove_inputs(job_id)
        raise


def ready_with_room(executor) -> None:
    # Called first in each handler, not a route dependency: FastAPI runs dependencies before it validates the
    # form, and a malformed request is a 422 whatever the worker's state.
    if not getattr(executor, "is_alive", lambda: True)():
        raise HTTPException(503, "the worker stopped (see the server's log); jobs cannot run until the server "
                                 "is restarted", headers={"Retry-After": "30"})
    if not executor.ready.is_set():
        raise HTTPException(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
    executor.check_capacity()


def enqueue(server: ServerState, job_id: str, request: dict) -> JSONResponse:
    store = server.store
    job = store.add(job_id, request)
    try:
        server.executor.submit(job_id)
    except QueueFull:
        store.delete(job_id)
        raise
    body = describe(job, server.executor)
    return JSONResponse(body, status_code=202, headers={"Location": body["urls"]["status"]})


@router.post("/v1/edits", status_code=202,
             dependencies=[*AUTHORIZED, Depends(KnownFieldsOnly(EditRequest, files=("video", "image")))],
             summary="Submit a video to edit (its motion moves a new first frame); returns the job id and URLs")
def submit_edit(server: Server,
                video: Annotated[UploadFile, File(description="the source clip: mp4, webm, mov or gif")],
                form: Annotated[EditForm, Form()],
                image: Annotated[UploadFile | None, File(description="the new first frame, PNG or JPEG; "
                                                         "absent: the clip's own (reconstruction)")] = None):
    executor, store, settings = server.executor, server.store, server.settings
    ready_with_room(executor)
    try:
        fields, output = split_form(form)
    except InputError as err:
        raise RequestError(422, str(err)) from err
    check_format(output["format"])
    request = build_request(EditRequest, fields, executor.defaults, server.sizing)
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
        return enqueue(server, job_id, {**request.as_dict(), "format": output["format"], "kind": EDIT,
                                        **_scale_fields(scale)})
    except BaseException:
        store.remove_inputs(job_id)
        raise


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


def _scale_fields(scale: OutputScale) -> dict:
    """The output scale as the stored job request names it (the worker reads it back when writing)."""
    return {"scale": scale.factor, "scale_filter": scale.filter}
