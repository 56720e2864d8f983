"""Job submission: POST /v1/animations (an image to animate) and POST /v1/edits (a clip to edit).

Each handler checks the request the way the CLI does, saves the upload beside the job and hands the job id
to the executor; the answer is the job as `GET` shows it, with a `Location` header.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image

from ..errors import InputError
from ..files import give_default_mode
from ..request import FAST_PRESET, REFERENCE_STEPS, resolve_options
from ..samplers import DEFAULT_SAMPLER, SAMPLERS
from ..scale import FILTER_HELP as SCALE_FILTER_HELP
from ..scale import HELP as SCALE_HELP
from ..scale import OutputScale
from .dependencies import AUTHORIZED, Server
from .job_view import describe
from .jobs import EDIT, new_job_id
from .limits import RequestError, check_clip, check_edit, check_request, check_scale, read_upload, save_clip_upload
from .runner import AnimationRequest, EditJobRequest, Runner
from .state import ServerState
from .worker import QueueFull

router = APIRouter()
# No docstrings on the handlers: FastAPI would publish them as the operations' descriptions.


@router.post("/v1/animations", status_code=202, dependencies=AUTHORIZED,
             summary="Submit an image to animate; returns the job id and its URLs")
def submit(server: Server,
           image: Annotated[UploadFile, File(description="the still image, PNG or JPEG")],
           prompt: Annotated[str, Form(description="what moves and how")],
           bucket: Annotated[int | None, Form(description="motion intensity 0..19, larger = more")] = 9,
           motion_id: Annotated[float | None, Form(description="raw motion id instead of bucket")] = None,
           negative_prompt: Annotated[str, Form()] = "",
           steps: Annotated[int | None, Form(description=f"sampling steps (default {REFERENCE_STEPS}, or "
                                                         f"{FAST_PRESET.steps} with fast)")] = None,
           guidance: Annotated[float, Form(description="CFG scale; 1 turns it off")] = 7.5,
           seed: Annotated[int | None, Form(description="seed; drawn and reported when absent")] = None,
           height: Annotated[int | None, Form(description="default: the model's")] = None,
           width: Annotated[int | None, Form(description="default: the model's")] = None,
           frames: Annotated[int | None, Form(description="frames after the input frame")] = None,
           segments: Annotated[int, Form(description="chained segments for longer videos")] = 1,
           sampler: Annotated[str | None, Form(description=f"one of {', '.join(SAMPLERS)} (default "
                                        f"{DEFAULT_SAMPLER}, or {FAST_PRESET.sampler} with fast)")] = None,
           format: Annotated[str, Form(description="mp4 or gif")] = "mp4",
           scale: Annotated[int, Form(description=SCALE_HELP)] = 1,
           scale_filter: Annotated[str, Form(description=SCALE_FILTER_HELP)] = OutputScale.filter,
           fast: Annotated[bool, Form(description="the measured fewer-UNet-calls preset: steps, sampler and "
                                      "step cache (the fields given override it)")] = False,
           cache: Annotated[float | None, Form(description="step cache threshold >= 0: skip the UNet while "
                                               "the estimated output change stays under it (e.g. 0.5)")] = None,
           guidance_until: Annotated[float | None, Form(description="fraction 0..1 of the steps that run "
                                                        "both CFG branches (default 1: all)")] = None,
           guidance_every: Annotated[int | None, Form(description="after guidance_until, refresh the "
                                                      "guidance direction every N-th step (N >= 1)")] = None):
    executor, store, settings, sizing = server.executor, server.store, server.settings, server.sizing
    ready_with_room(executor)
    try:  # the request stores the options resolved, so it reproduces the video without the preset
        steps, sampler, options = resolve_options(fast, steps, sampler, cache=cache, guidance_until=guidance_until,
                                                  guidance_every=guidance_every)
        wanted = AnimationRequest(prompt=prompt, bucket=None if motion_id is not None else bucket,
                                  motion_id=motion_id, negative_prompt=negative_prompt, steps=steps,
                                  guidance=guidance, seed=seed, height=height, width=width, frames=frames,
                                  segments=segments, sampler=sampler, cache=options.cache,
                                  guidance_until=options.guidance_until,
                                  guidance_every=options.guidance_every).resolved(executor.defaults)
        check_request(wanted, format, settings.limits, sizing=sizing)
        output = check_scale(scale, scale_filter, wanted)
        Runner.pipeline_request(wanted)  # what the pipeline itself refuses (sampler, eta with it, ...)
    except InputError as err:
        raise RequestError(422, str(err)) from err
    pixels = read_upload(image.file.read(settings.limits.max_upload_bytes + 1), settings.limits)
    job_id = new_job_id()
    try:  # an input is kept only with its job: no orphan upload when the database refuses the job
        _save_png_atomically(pixels, store.input_path(job_id))
        return enqueue(server, job_id, {**wanted.__dict__, "format": format, **_scale_fields(output)})
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


@router.post("/v1/edits", status_code=202, dependencies=AUTHORIZED,
             summary="Submit a video to edit (its motion moves a new first frame); returns the job id and URLs")
def submit_edit(server: Server,
                video: Annotated[UploadFile, File(description="the source clip: mp4, webm, mov or gif")],
                image: Annotated[UploadFile | None, File(description="the new first frame, PNG or JPEG; "
                                                         "absent: the clip's own (reconstruction)")] = None,
                prompt: Annotated[str | None, Form(description="the edited video; default: source_prompt")] = None,
                source_prompt: Annotated[str, Form(description="the source clip (for the inversion)")] = "",
                bucket: Annotated[str, Form(description="motion intensity 0..19, or auto: measured on the "
                                                        "clip")] = "auto",
                motion_id: Annotated[float | None, Form(description="raw motion id instead of bucket")] = None,
                negative_prompt: Annotated[str, Form()] = "",
                steps: Annotated[int, Form(description="inversion and sampling steps")] = EditJobRequest.steps,
                guidance: Annotated[float, Form(description="CFG scale while sampling; 1 turns it off")] = 1.0,
                inversion_guidance: Annotated[float, Form(description="CFG scale while inverting")] = 1.0,
                seed: Annotated[int | None, Form(description="seed; drawn and reported when absent")] = None,
                height: Annotated[int | None, Form(description="default: the model's")] = None,
                width: Annotated[int | None, Form(description="default: the model's")] = None,
                frames: Annotated[int | None, Form(description="frames after the first, per segment")] = None,
                stride: Annotated[int | None, Form(description="use every stride-th clip frame (default: "
                                                               "spanning about 2 s)")] = None,
                start: Annotated[float, Form(description="seconds into the clip")] = 0.0,
                segments: Annotated[int, Form(description="chained segments over consecutive windows")] = 1,
                format: Annotated[str, Form(description="mp4 or gif")] = "mp4",
                scale: Annotated[int, Form(description=SCALE_HELP)] = 1,
                scale_filter: Annotated[str, Form(description=SCALE_FILTER_HELP)] = OutputScale.filter,
                use_dct: Annotated[bool, Form(description="mix the new frame's low frequencies into the "
                                                          "inverted latents (DCTInit)")] = True):
    executor, store, settings, sizing = server.executor, server.store, server.settings, server.sizing
    ready_with_room(executor)
    try:
        number = None if bucket.strip().lower() == "auto" or motion_id is not None else int(bucket)
    except ValueError as err:
        raise RequestError(422, f"bucket must be a whole number in 0..19 or auto; got {bucket!r}") from err
    wanted = EditJobRequest(
        prompt=source_prompt if prompt is None else prompt, source_prompt=source_prompt, bucket=number,
        motion_id=motion_id, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
        inversion_guidance=inversion_guidance, seed=seed, height=height, width=width, frames=frames,
        stride=stride, start=start, segments=segments, use_dct=use_dct).resolved(executor.defaults)
    check_edit(wanted, format, settings.limits, sizing=sizing)
    output = check_scale(scale, scale_filter, wanted)
    pixels = None
    if image is not None and image.filename:
        pixels = read_upload(image.file.read(settings.limits.max_upload_bytes + 1), settings.limits)
    job_id = new_job_id()
    clip = store.clip_path(job_id)
    save_clip_upload(video.file, clip, settings.limits)
    try:
        wanted = wanted.measured(*check_clip(clip, wanted))  # the stride and an auto bucket, as the CLI prints
        if pixels is not None:
            _save_png_atomically(pixels, store.input_path(job_id))
        return enqueue(server, job_id, {**wanted.__dict__, "format": format, "kind": EDIT, **_scale_fields(output)})
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
