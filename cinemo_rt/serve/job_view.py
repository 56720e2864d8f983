"""A job as the API shows it: its state, progress, request, warnings and URLs."""

from __future__ import annotations

from .jobs import DONE, EDIT, QUEUED, RUNNING, Job

COLLECTIONS = {"animation": "animations", EDIT: "edits"}  # job kind -> its URL prefix under /v1


def describe(job: Job, executor) -> dict:
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
