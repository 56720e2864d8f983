"""A small Python client for the HTTP API, and a `cinemo-rt serve` child process on the loopback (used by the
tests and benchmarks/serving.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

FINAL = ("done", "failed", "cancelled")


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def submit(self, image: bytes | str | os.PathLike, prompt: str, **fields) -> httpx.Response:
        """POST /v1/animations; fields as the API names them (steps, seed, bucket, format, ...)."""
        data = _bytes(image)
        form = {"prompt": prompt, **{k: str(v) for k, v in fields.items() if v is not None}}
        return self.http.post("/v1/animations", files={"image": ("image.png", data, "image/png")}, data=form)

    def submit_edit(self, video: bytes | str | os.PathLike, prompt: str | None = None,
                    image: bytes | str | os.PathLike | None = None, **fields) -> httpx.Response:
        """POST /v1/edits: the source clip, optionally a new first frame; fields as the API names them (steps,
        seed, bucket, stride, start, frames, ...). The job routes below serve edits too."""
        files = {"video": ("video", _bytes(video), "application/octet-stream")}
        if image is not None:
            files["image"] = ("image.png", _bytes(image), "image/png")
        form = {k: str(v) for k, v in {"prompt": prompt, **fields}.items() if v is not None}
        return self.http.post("/v1/edits", files=files, data=form)

    def status(self, job_id: str) -> dict:
        return self.http.get(f"/v1/animations/{job_id}").json()

    def wait(self, job_id: str, states=FINAL, timeout: float = 600.0, poll: float = 0.05) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = self.status(job_id)
            if body.get("state") in states or time.monotonic() > deadline:
                return body
            time.sleep(poll)

    def video(self, job_id: str) -> bytes:
        response = self.http.get(f"/v1/animations/{job_id}/video")
        response.raise_for_status()
        return response.content

    def delete(self, job_id: str) -> dict:
        return self.http.delete(f"/v1/animations/{job_id}").json()

    def close(self) -> None:
        self.http.close()


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
