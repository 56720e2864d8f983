"""The Python client of the HTTP API, and a `cinemo-rt serve` child process on the loopback (used by the
tests and benchmarks/serving.py).

    from cinemo_rt.serve.client import Client
    with Client("http://127.0.0.1:8000") as client:
        job = client.submit("photo.png", "the camera pans left", bucket=15, scale=8)
        client.wait(job, timeout=120).warnings      # e.g. words the demo model does not know
        client.download(job, "pan.mp4")

Every call returns a typed `Job` (or raises `ApiError` with the server's own message and status: 404 for an
unknown job, 422 for a bad field, ...). Fields are the API's names (`steps`, `seed`, `bucket`, `format`,
`scale`, ...: README, Serving), sent as form fields.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..request import EditRequest, Request

FINAL = ("done", "failed", "cancelled")


class ApiError(Exception):
    """The server refused a call: `status` is the HTTP status, the message the server's `detail`."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after  # seconds, when the server said (429, 503)


class JobFailed(Exception):
    """`wait` found the job failed (the server's reason) or cancelled."""

    def __init__(self, job: "Job"):
        super().__init__(f"job {job.id} {job.state}: {job.error or 'no reason given'}")
        self.job = job


@dataclass(frozen=True)
class Job:
    """A job as the server describes it (GET /v1/animations/{id}); `request` is the resolved request."""

    id: str
    state: str
    kind: str = "animation"
    request: dict = field(default_factory=dict)
    urls: dict = field(default_factory=dict)
    position: int | None = None      # queued: place in the queue
    step: int | None = None          # running: steps done of `total`
    total: int | None = None
    unet_calls: int | None = None
    warnings: tuple[str, ...] = ()   # what the model cannot read in the prompt (unknown words, empty prompt)
    error: str | None = None
    created: float | None = None
    started: float | None = None
    finished: float | None = None

    @classmethod
    def from_json(cls, body: dict) -> "Job":
        known = cls.__dataclass_fields__
        values = {k: v for k, v in body.items() if k in known}
        values["warnings"] = tuple(body.get("warnings") or ())
        return cls(**values)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL


JobRef = Job | str


class Client:
    """`Client(url, api_key)`: submit animations and edits, follow them, fetch their videos."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- calls ----------------------------------------------------------------------------------------
    def model(self) -> dict:
        """GET /v1/model: the model's video size and frames, parameters, closed vocabulary, training."""
        return self._json(self.http.get("/v1/model"))

    def submit(self, image: bytes | str | os.PathLike, prompt: str | Request, **fields) -> Job:
        """POST /v1/animations: the image (bytes or a path) and a prompt with `Request`'s fields (steps, seed,
        bucket, ...), or a `Request` itself."""
        form = _form(_fields_of(prompt, fields))
        return Job.from_json(self._json(self.http.post(
            "/v1/animations", files={"image": ("image.png", _bytes(image), "image/png")}, data=form)))

    def submit_edit(self, video: bytes | str | os.PathLike, prompt: str | EditRequest | None = None,
                    image: bytes | str | os.PathLike | None = None, **fields) -> Job:
        """POST /v1/edits: the source clip, optionally a new first frame; a prompt with `EditRequest`'s fields
        (steps, seed, bucket, stride, start, frames, ...), or an `EditRequest` itself."""
        files = {"video": ("video", _bytes(video), "application/octet-stream")}
        if image is not None:
            files["image"] = ("image.png", _bytes(image), "image/png")
        form = _form(_fields_of(prompt, fields))
        return Job.from_json(self._json(self.http.post("/v1/edits", files=files, data=form)))

    def status(self, job: JobRef) -> Job:
        return Job.from_json(self._json(self.http.get(_status_url(job))))

    def wait(self, job: JobRef, timeout: float = 600.0, states=FINAL, poll: float = 0.05,
             max_poll: float = 2.0, check: bool = True) -> Job:
        """Poll until the job reaches one of `states` (default: the final ones) or ends, waiting `poll` seconds at
        first and 1.5x longer each time up to `max_poll`. TimeoutError after `timeout` s; with `check`, a job
        that failed or was cancelled (unless `states` asks for that) raises `JobFailed` with the server's
        reason; an unknown job raises ApiError (404)."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.status(job)
            if current.state in states or current.is_final:  # a final job will not reach any other state
                asked = current.state in states and tuple(states) != FINAL
                if check and current.state in ("failed", "cancelled") and not asked:
                    raise JobFailed(current)
                return current
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {current.id} is still {current.state} after {timeout:g} s")
            time.sleep(min(poll, left))
            poll = min(max_poll, poll * 1.5)

    def video(self, job: JobRef) -> bytes:
        """The finished video's bytes (ApiError 409 until it is done)."""
        response = self.http.get(f"{_status_url(job)}/video")
        _raise_for(response)
        return response.content

    def download(self, job: JobRef, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """The finished video to `path`, written to a temporary file beside it and renamed when complete.
        An existing file is replaced only with `overwrite`."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        data = self.video(job)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def delete(self, job: JobRef) -> str:
        """Cancel queued or running work, or delete a finished job; returns the new state."""
        return self._json(self.http.delete(_status_url(job)))["state"]

    @staticmethod
    def _json(response: httpx.Response) -> dict:
        _raise_for(response)
        return response.json()


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if not isinstance(detail, str):  # FastAPI's own validation errors are a list of problems
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    retry = response.headers.get("retry-after")
    raise ApiError(response.status_code, detail, float(retry) if retry and retry.isdigit() else None)


def _status_url(job: JobRef) -> str:
    if isinstance(job, Job) and job.urls.get("status"):
        return job.urls["status"]
    return f"/v1/animations/{job.id if isinstance(job, Job) else job}"  # any job id works under either prefix


def _fields_of(prompt, fields: dict) -> dict:
    """The form's request fields: a request's own (the server checks them again), or a prompt and keywords."""
    if isinstance(prompt, (Request, EditRequest)):
        return {**prompt.as_dict(), **fields}
    return {"prompt": prompt, **fields}


def _form(fields: dict) -> dict:
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items() if v is not None}


def _bytes(source: bytes | str | os.PathLike) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m cinemo_rt.cli serve --jobs DIR ...` on a free loopback port; `kill()` sends SIGKILL."""

    def __init__(self, jobs: str | os.PathLike, *args: str, port: int | None = None,
                 log: str | os.PathLike | None = None, ready_timeout: float = 180.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        env.setdefault("OMP_NUM_THREADS", "1")
        self.log_path = Path(log) if log else Path(jobs).parent / f"server-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cinemo_rt.cli", "serve", "--jobs", str(jobs), "--host", "127.0.0.1",
             "--port", str(self.port), *args], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server was not ready after {timeout} s: {self.log_path.read_text()}")

    def client(self, api_key: str | None = None) -> Client:
        return Client(self.url, api_key)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(60)
        self._log.close()
