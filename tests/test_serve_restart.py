"""`cinemo-rt serve` as a real process on the loopback: killed with SIGKILL mid-job and restarted, it still
serves the finished video and reports the interrupted jobs as failed (--requeue: tests/test_serve.py)."""

import signal

import pytest

pytest.importorskip("fastapi", reason="serving extras: pip install -e '.[serve]'")

from cinemo_rt.defaults import EXAMPLE_IMAGE  # noqa: E402
from cinemo_rt.serve.client import ServerProcess  # noqa: E402

PROMPT = "the camera pans left"


def submit(client, **fields) -> str:
    return client.submit(EXAMPLE_IMAGE, PROMPT, seed=1, **fields).id


@pytest.mark.slow
def test_kill_9_restart_keeps_videos_and_fails_interrupted_jobs(tmp_path):
    jobs = tmp_path / "jobs"
    server = ServerProcess(jobs, "--max-batch", "1")
    try:
        client = server.client()
        finished = submit(client, steps=2)
        assert client.wait(finished).state == "done"
        long = submit(client, steps=100, segments=8)  # minutes of work: still running when killed
        assert client.wait(long, states=("running",)).state == "running"
        queued = submit(client, steps=2)
    finally:
        server.kill()

    server = ServerProcess(jobs, "--max-batch", "1")
    try:
        client = server.client()
        assert client.video(finished)[4:8] == b"ftyp"  # the mp4, whole
        for job_id in (long, queued):
            job = client.status(job_id)
            assert job.state == "failed" and "interrupted" in job.error, job
        assert client.wait(submit(client, steps=2)).state == "done"  # and it goes on working
    finally:
        server.kill(signal.SIGTERM)
    assert not list((jobs / "videos").glob(".*")), "a temporary video was left behind"
