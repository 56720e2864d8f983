"""The Python client (`cinemo_rt.serve.client`) against a live server: uvicorn on the loopback, the demo model.

What a user of the client meets: typed jobs, the server's own message on every refusal (404 included), a
wait that backs off and times out, downloads written whole, edits, the model's facts and the prompt's
warnings carried with the job."""

import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serving extras: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="serving extras: pip install -e '.[serve]'")

from cinemo_rt.defaults import EXAMPLE_IMAGE  # noqa: E402
from cinemo_rt.serve.app import ServeSettings, create_app  # noqa: E402
from cinemo_rt.serve.client import ApiError, Client, Job, JobFailed  # noqa: E402
from cinemo_rt.serve.runner import Runner  # noqa: E402
from cinemo_rt.video import read_video, write_video  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runner = Runner.open()
    app = create_app(ServeSettings(jobs_dir=tmp_path_factory.mktemp("serve") / "jobs"), open_runner=lambda: runner)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with Client(url) as client:
        while time.monotonic() < deadline:
            try:
                client.model()
                break
            except (ApiError, OSError):  # 503 while loading; refused before uvicorn listens
                time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def client(server_url):
    with Client(server_url) as client:
        yield client


def test_model_facts_say_what_the_demo_can_do(client):
    facts = client.model()
    assert (facts["height"], facts["width"], facts["frames"], facts["video_frames"]) == (32, 32, 8, 9)
    assert facts["name"] == "demo" and 1_000_000 < facts["parameters"] < 2_000_000
    assert {"pan", "left", "zoom"} <= set(facts["vocabulary"]) and "dog" not in facts["vocabulary"]
    assert "synthetic 32x32 clips" in facts["trained_on"]


def test_animation_typed_job_warnings_scale_and_download(client, tmp_path):
    job = client.submit(EXAMPLE_IMAGE, "a dog pans left", steps=3, seed=1, scale=4, scale_filter="lanczos")
    assert isinstance(job, Job) and job.state == "queued" and job.request["scale"] == 4
    assert len(job.warnings) == 1 and "does not know 'dog'" in job.warnings[0]  # known with the job, before it runs
    done = client.wait(job, timeout=120)
    assert done.state == "done" and done.unet_calls == 6 and done.warnings == job.warnings
    path = client.download(done, tmp_path / "pan.mp4")
    assert read_video(path).shape == (9, 128, 128, 3)  # the demo's 32x32, scaled 4x
    assert [p.name for p in tmp_path.iterdir()] == ["pan.mp4"]  # written whole: no temporary left
    with pytest.raises(FileExistsError):
        client.download(done, path)
    assert client.download(done.id, path, overwrite=True) == path
    assert client.delete(done) == "deleted"
    # A request object is the same vocabulary: the server stores it as resolved (its seed, the demo's size).
    from cinemo_rt.request import Request

    same = client.wait(client.submit(EXAMPLE_IMAGE, Request("a dog pans left", steps=3, seed=1), scale=4,
                                     scale_filter="lanczos"), timeout=120)
    assert same.request == {**done.request, "scale": 4} and same.unet_calls == done.unet_calls
    assert client.download(same, tmp_path / "same.mp4").read_bytes() == path.read_bytes()


def test_errors_carry_the_servers_message(client):
    with pytest.raises(ApiError) as unknown:
        client.status("0" * 32)
    assert unknown.value.status == 404 and "unknown, deleted, or expired" in unknown.value.message
    started = time.monotonic()
    with pytest.raises(ApiError) as waited:  # an unknown job is an error at once, not 10 minutes of polling
        client.wait("f" * 32, timeout=60)
    assert waited.value.status == 404 and time.monotonic() - started < 5
    with pytest.raises(ApiError) as refused:
        client.submit(EXAMPLE_IMAGE, "pan left", bucket=25)
    assert refused.value.status == 422 and "bucket must be a whole number in 0..19" in refused.value.message
    with pytest.raises(ApiError, match="scale must be a whole number in 1..16"):
        client.submit(EXAMPLE_IMAGE, "pan left", scale=40)


def test_wait_times_out_then_a_cancelled_job_raises(client):
    job = client.submit(EXAMPLE_IMAGE, "pan left", steps=100, segments=8, seed=2)
    with pytest.raises(TimeoutError, match="still"):
        client.wait(job, timeout=0.3)
    client.wait(job, states=("running",), timeout=60)
    assert client.delete(job) in ("cancelling", "cancelled")
    with pytest.raises(JobFailed, match="cancelled"):
        client.wait(job, timeout=60)
    assert client.wait(job, timeout=60, check=False).state == "cancelled"


def test_edit_reports_the_measured_bucket_and_stride(client, tmp_path):
    from cinemo_rt.demo_data import photo, render_clip

    clip = tmp_path / "clip.gif"
    write_video(render_clip(photo("chelsea"), "pan_left", 0.5, 12, 32, np.random.default_rng(0)), clip, fps=8,
                format="gif")
    job = client.submit_edit(clip, "the camera pans left", image=EXAMPLE_IMAGE, frames=3, steps=2, seed=1)
    assert job.kind == "edit"
    assert isinstance(job.request["bucket"], int) and 0 <= job.request["bucket"] <= 19  # auto, measured
    assert job.request["stride"] == 3  # 8 fps: the 2 s default is 5 for 3 frames, shrunk to fit the 12-frame clip
    done = client.wait(job, timeout=120)
    assert done.warnings == () and done.request == job.request
    assert read_video(client.download(done, tmp_path / "edit.mp4")).shape == (4, 32, 32, 3)
