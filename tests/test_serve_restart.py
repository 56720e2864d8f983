"""`cinemo-rt serve` as a real process on the loopback: killed with SIGKILL mid-job and restarted, it still
serves the finished video and reports the interrupted job as failed (or runs it again with --requeue)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="serving extras: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="serving extras: pip install -e '.[serve]'")

from cinemo_rt.defaults import EXAMPLE_IMAGE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, jobs: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.log = open(jobs.parent / f"server-{self.port}.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cinemo_rt.cli", "serve", "--jobs", str(jobs), "--port", str(self.port),
             "--max-batch", "1", *extra], stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, Path(self.log.name).read_text()
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not become ready: " + Path(self.log.name).read_text())

    def submit(self, **fields) -> dict:
        with open(EXAMPLE_IMAGE, "rb") as image:
            response = httpx.post(self.url + "/v1/animations", files={"image": image},
                                  data={"prompt": "the camera pans left", "seed": "1", **fields}, timeout=30)
        assert response.status_code == 202, response.text
        return response.json()

    def status(self, job) -> dict:
        return httpx.get(self.url + job["urls"]["status"], timeout=30).json()

    def wait(self, job, states, timeout=120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.status(job)
            if body["state"] in states:
                return body
            time.sleep(0.05)
        raise AssertionError(f"job never reached {states}: {body}")

    def kill(self, sig=signal.SIGKILL) -> None:
        self.process.send_signal(sig)
        self.process.wait(30)
        self.log.close()


@pytest.mark.slow
def test_kill_9_restart_keeps_videos_and_fails_or_requeues_interrupted_jobs(tmp_path):
    jobs = tmp_path / "jobs"
    server = Server(jobs)
    try:
        finished = server.wait(server.submit(steps="2"), ("done",))
        long = server.submit(steps="100", segments="8")  # minutes of work: still running when killed
        server.wait(long, ("running",))
        queued = server.submit(steps="2")
    finally:
        server.kill()

    server = Server(jobs)
    try:
        video = httpx.get(server.url + finished["urls"]["video"], timeout=30)
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"  # an mp4, whole
        for job in (long, queued):
            body = server.status(job)
            assert body["state"] == "failed" and "interrupted" in body["error"], body
        again = server.submit(steps="100", segments="8")
        server.wait(again, ("running",))
        after = server.submit(steps="2")
    finally:
        server.kill()
    assert not list((jobs / "videos").glob(".*")), "a temporary video was left behind"

    server = Server(jobs, "--requeue")
    try:
        assert server.status(again)["state"] in ("queued", "running")  # re-queued, not failed
        assert httpx.delete(server.url + again["urls"]["status"], timeout=30).status_code == 200
        assert server.wait(again, ("cancelled",))["state"] == "cancelled"
        assert server.wait(after, ("done",))["state"] == "done"  # re-queued behind it, and run
    finally:
        server.kill(signal.SIGTERM)
