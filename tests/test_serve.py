"""The HTTP API in-process (FastAPI TestClient), the job store, and batching equivalence, on the demo model."""

import dataclasses
import io
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serving extras: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from cinemo_rt.defaults import EXAMPLE_IMAGE  # noqa: E402
from cinemo_rt.image import load_image  # noqa: E402
from cinemo_rt.serve.app import ServeSettings, create_app  # noqa: E402
from cinemo_rt.serve.batching import BatchPolicy  # noqa: E402
from cinemo_rt.serve.client import Client  # noqa: E402
from cinemo_rt.serve.jobs import DONE, FAILED, JobStore, new_job_id  # noqa: E402
from cinemo_rt.serve.limits import Limits  # noqa: E402
from cinemo_rt.request import Request  # noqa: E402
from cinemo_rt.serve.runner import Runner  # noqa: E402
from cinemo_rt.video import read_video  # noqa: E402

STEPS = "3"
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def runner():
    return Runner.open(max_batch=4, exact=True)  # the bit-for-bit tests below need the fixed row count


def png_bytes(size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(EXAMPLE_IMAGE).convert("RGB").resize(size))).save(buffer, "PNG")
    return buffer.getvalue()


def submit(client, headers=None, image=None, **fields):
    data = {"prompt": "the camera pans left", "steps": STEPS, "seed": "1", **fields}
    files = {"image": ("photo.png", image if image is not None else png_bytes(), "image/png")}
    return client.post("/v1/animations", data=data, files=files, headers=headers or {})


def wait_final(client, job_id, headers=None, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/animations/{job_id}", headers=headers or {}).json()
        if body["state"] in ("done", "failed", "cancelled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {body}")


def make_client(tmp_path, runner, **overrides):
    settings = ServeSettings(jobs_dir=tmp_path / "jobs", **overrides)
    return TestClient(create_app(settings, open_runner=lambda: runner))


def test_job_runs_end_to_end_with_events_video_and_metrics(tmp_path, runner):
    with make_client(tmp_path, runner) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        response = submit(client, format="gif")
        assert response.status_code == 202, response.text
        job = response.json()
        assert response.headers["location"] == job["urls"]["status"]
        assert job["state"] == "queued" and job["request"]["height"] == runner.defaults.height

        with client.stream("GET", job["urls"]["events"]) as events:
            states = [json.loads(line[6:]) for line in events.iter_lines() if line.startswith("data: ")]
        assert states[-1]["state"] == "done"
        assert {s["state"] for s in states} <= {"queued", "running", "done"}

        video = client.get(job["urls"]["video"])
        assert video.status_code == 200 and video.headers["content-type"] == "image/gif"
        path = tmp_path / "out.gif"
        path.write_bytes(video.content)
        frames = read_video(path)
        assert frames.shape == (runner.defaults.frames + 1, runner.defaults.height, runner.defaults.width, 3)

        metrics = client.get("/metrics").text
        assert 'cinemo_jobs{state="done"} 1.0' in metrics
        assert "cinemo_denoise_steps_total 3.0" in metrics
        assert "cinemo_queue_length 0.0" in metrics

        assert client.delete(job["urls"]["status"]).json()["state"] == "deleted"
        assert client.get(job["urls"]["status"]).status_code == 404
        assert not any((tmp_path / "jobs" / "videos").iterdir())


def test_api_key_limits_and_unknown_jobs(tmp_path, runner):
    limits = Limits(max_upload_bytes=200_000, max_image_pixels=100 * 100)
    with make_client(tmp_path, runner, api_key=KEY, limits=limits) as client:
        good = {"Authorization": f"Bearer {KEY}"}
        assert submit(client).status_code == 401
        assert submit(client, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/animations/" + "0" * 32).status_code == 401
        assert client.get("/v1/animations/" + "0" * 32, headers={"X-API-Key": KEY}).status_code == 404
        assert client.get("/v1/animations/..%2F..%2Fjobs.sqlite3", headers=good).status_code == 404

        def refused(expected, **fields):
            response = submit(client, headers=good, **fields)
            assert response.status_code == expected, response.text
            return response.json()["detail"]

        # the request's own checks (tests/test_vocabulary.py runs them all through the CLI and the server)
        assert "steps must be in 1..1000" in refused(422, steps="1001")
        assert "bucket" in refused(422, bucket="20")
        assert "memory" in refused(422, frames="1024", height="8192", width="8192")  # the CLI's size check
        assert "segments is 65; it must be in 1..64" in refused(422, segments="65")
        assert "the limit is 10000" in refused(422, prompt="x" * 10_001)
        assert "divisible by 8" in refused(422, height="36")
        assert "format" in refused(422, format="avi")
        assert "sampler" in refused(422, sampler="euler")
        assert "could not be read" in refused(400, image=b"not an image at all")
        assert "pixels" in refused(413, image=png_bytes((101, 100)))  # pixel count, read before decoding
        noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
        big = io.BytesIO()
        Image.fromarray(noise).save(big, "PNG")
        assert "bytes" in refused(413, image=big.getvalue())  # checked on the image itself
        huge = client.post("/v1/animations", headers={**good, "Content-Length": str(10**9)}, content=b"x")
        assert huge.status_code == 413  # refused from the header, before the body is read
        assert not any((tmp_path / "jobs" / "inputs").iterdir())  # nothing of a refused request is kept


class GatedRunner:
    """A real runner whose denoising steps wait for the test's go-ahead."""

    def __init__(self, runner):
        self.runner = runner
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def step(self, group):
        self.entered.set()
        assert self.gate.wait(30)
        self.runner.step(group)


def test_queue_full_position_and_cancel(tmp_path, runner):
    gated = GatedRunner(runner)
    settings = ServeSettings(jobs_dir=tmp_path / "jobs", max_queue=1, policy=BatchPolicy(max_batch=1, max_wait_ms=0))
    with TestClient(create_app(settings, open_runner=lambda: gated)) as client:
        running = submit(client).json()
        assert gated.entered.wait(30)
        queued = submit(client).json()
        assert client.get(queued["urls"]["status"]).json()["position"] == 1
        full = submit(client)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert client.delete(queued["urls"]["status"]).json()["state"] == "cancelled"
        assert client.delete(running["urls"]["status"]).json()["state"] == "cancelling"
        status = client.get(running["urls"]["status"]).json()
        assert status["state"] == "running" and status["total"] == int(STEPS)
        gated.gate.set()
        assert wait_final(client, running["id"])["state"] == "cancelled"
        assert client.get(queued["urls"]["status"]).json()["state"] == "cancelled"
        assert client.get(running["urls"]["video"]).status_code == 409
        assert 'cinemo_http_rejections_total{status="429"} 1.0' in client.get("/metrics").text


def run_group(runner, image, group, calls=None):
    """Denoise `group` together, one runner step per UNet call of the segments still running (with fewer
    calls they finish at different steps) -> videos; `calls` gets each request's UNet calls."""
    segments = [runner.prepare(image, r) for r in group]
    while live := [s for s in segments if not s.done]:
        runner.step(live)
    if calls is not None:
        calls.extend(s.counter.calls for s in segments)
    return [runner.finish(s) for s in segments]


def test_batched_requests_equal_running_alone(runner):
    image = load_image(EXAMPLE_IMAGE)
    requests = [Request(prompt=p, bucket=b, seed=s, guidance=g, steps=3).resolve(runner.defaults)
                for p, b, s, g in [("the camera pans left", 15, 1, 7.5), ("the camera pans right", 3, 2, 1.0),
                                   ("zooms in", 9, 3, 5.0)]]

    def run(group, runner=runner):
        return run_group(runner, image, group)

    alone = [run([r])[0] for r in requests]
    together = run(requests)
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)  # bit for bit
    assert not np.array_equal(alone[0], alone[1])
    # another sampler batches the same way (its requests share UNet calls only with each other)
    dpm = [dataclasses.replace(r, sampler="dpmpp-2m") for r in requests[:2]]
    for a, b in zip([run([r])[0] for r in dpm], run(dpm)):
        assert np.array_equal(a, b)
    # without the padding, batched rows may differ from alone in the last bits: the same video within 2 levels
    loose = run(requests, Runner(runner.animator, max_batch=4, exact=False))
    for a, b in zip(alone, loose):
        assert np.abs(a.astype(int) - b).max() <= 2
    # batching off: the same video as the Animator (`cinemo-rt run`) for a guided request
    r = requests[0]
    reference = runner.animator(image, r.prompt, r.bucket, steps=r.steps, guidance=r.guidance, seed=r.seed)
    assert np.array_equal(run([r], Runner(runner.animator, max_batch=1))[0], reference)


def test_fewer_calls_requests_batch_with_plain_ones_bit_for_bit(runner):
    """A step-cached and a guidance-truncated request next to a plain one: each skips or halves its own calls
    (never waiting in the batch for a call it does not make) and gets the video it gets alone."""
    image = load_image(EXAMPLE_IMAGE)
    base = dict(prompt="the camera pans left", steps=8, sampler="dpmpp-2m")
    requests = [Request(**base, seed=1).resolve(runner.defaults),
                Request(**base, seed=2, cache=0.5).resolve(runner.defaults),
                Request(**base, seed=3, guidance_until=0.25, guidance_every=3).resolve(runner.defaults)]
    alone_calls, together_calls = [], []
    alone = [run_group(runner, image, [r], alone_calls)[0] for r in requests]
    together = run_group(runner, image, requests, together_calls)
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)  # bit for bit
    assert together_calls == alone_calls
    plain, cached, truncated = alone_calls
    # guided on steps 0, 1, 3, 6 (the first quarter, then every 3rd): 4 x 2 + 4 x 1 rows
    assert plain == 16 and cached < 16 and truncated == 12, alone_calls
    # batching off: the Animator's video and UNet calls for the step-cached request
    r = requests[1]
    reference = runner.animator(image, r.prompt, r.bucket, steps=r.steps, sampler=r.sampler, seed=r.seed,
                                cache=r.cache)
    single = []
    assert np.array_equal(run_group(Runner(runner.animator, max_batch=1), image, [r], single)[0], reference)
    assert single == [runner.animator.last_unet_calls] == [cached]


def test_fast_requests_over_http_report_unet_calls(tmp_path, runner):
    gated = GatedRunner(runner)
    settings = ServeSettings(jobs_dir=tmp_path / "jobs", policy=BatchPolicy(max_batch=4, max_wait_ms=0))
    with TestClient(create_app(settings, open_runner=lambda: gated)) as client:
        for fields, words in [({"cache": "-1"}, "cache threshold"), ({"guidance_until": "1.5"}, "guidance_until"),
                              ({"guidance_every": "0"}, "guidance_every"), ({"cache": "nan"}, "cache threshold")]:
            refused = submit(client, **fields)
            assert refused.status_code == 422 and words in refused.json()["detail"], refused.text
        plain = submit(client, steps="6", sampler="dpmpp-2m").json()
        assert gated.entered.wait(30)  # the plain request holds the worker at its first call
        fast = submit(client, steps="6", fast="true", seed="2").json()
        assert fast["request"]["cache"] == 0.5 and fast["request"]["sampler"] == "dpmpp-2m"
        gated.gate.set()
        plain, fast = (wait_final(client, job["id"]) for job in (plain, fast))
        assert plain["state"] == fast["state"] == "done"
        assert plain["unet_calls"] == 12 and 2 <= fast["unet_calls"] < 12, (plain, fast)
        metrics = client.get("/metrics").text
        assert f"cinemo_unet_calls_total {plain['unet_calls'] + fast['unet_calls']}.0" in metrics
        assert "cinemo_denoise_steps_total 12.0" in metrics  # skipped steps are steps done too
        batched = client.get(fast["urls"]["video"]).content
        preset = submit(client, fast="true", steps="").json()  # no steps given: the preset's
        assert (preset["request"]["steps"], preset["request"]["guidance_until"]) == (20, 1.0)
        client.delete(preset["urls"]["status"])
    with make_client(tmp_path / "alone", runner) as client:
        alone = submit(client, steps="6", fast="true", seed="2").json()
        alone = wait_final(client, alone["id"])
        assert alone["unet_calls"] == fast["unet_calls"]
        assert client.get(alone["urls"]["video"]).content == batched


def test_worker_batches_concurrent_requests(tmp_path, runner):
    gated = GatedRunner(runner)
    settings = ServeSettings(jobs_dir=tmp_path / "jobs", policy=BatchPolicy(max_batch=4, max_wait_ms=0))
    with TestClient(create_app(settings, open_runner=lambda: gated)) as client:
        first = submit(client, seed="1").json()
        assert gated.entered.wait(30)  # the first request holds the worker at its first step
        others = [submit(client, seed=str(seed), prompt="zooms in").json() for seed in (2, 3)]
        gated.gate.set()
        for job in [first, *others]:
            assert wait_final(client, job["id"])["state"] == "done"
        metrics = client.get("/metrics").text
        # the first step ran alone, the newcomers joined it at its second (continuous batching):
        # UNet calls with 1, 3, 3 and 2 requests
        assert 'cinemo_batch_requests_bucket{le="1.0"} 1.0' in metrics
        assert "cinemo_batch_requests_count 4.0" in metrics and "cinemo_batch_requests_sum 9.0" in metrics
        batched = client.get(others[1]["urls"]["video"]).content
    with make_client(tmp_path / "alone", runner) as client:
        alone = submit(client, seed="3", prompt="zooms in").json()
        assert wait_final(client, alone["id"])["state"] == "done"
        assert client.get(alone["urls"]["video"]).content == batched


def test_store_recovers_interrupted_jobs_and_expires_old_ones(tmp_path):
    store = JobStore(tmp_path)
    done, running, queued = new_job_id(), new_job_id(), new_job_id()
    for job_id in (done, running, queued):
        store.add(job_id, {"format": "mp4"})
        store.input_path(job_id).write_bytes(b"png")
    store.mark_running(running)
    store.mark_running(done)
    store.finish(done, DONE)
    assert store.recover(requeue=True) == [running, queued]
    assert store.counts()["queued"] == 2
    assert store.recover() == []
    assert store.get(running).state == FAILED and "interrupted" in store.get(running).error
    assert not store.input_path(running).exists()
    store.video_path(store.get(done)).write_bytes(b"video")
    assert store.expire(3600) == 0
    time.sleep(0.01)
    assert store.expire(0) == 3
    assert store.get(done) is None and not any(store.videos.iterdir())


def test_requeue_runs_jobs_a_stopped_server_left(tmp_path, runner):
    store = JobStore(tmp_path / "jobs")
    left = new_job_id()
    Image.open(io.BytesIO(png_bytes())).save(store.input_path(left))
    request = Request(prompt="zooms in", steps=2, seed=5).resolve(runner.defaults)
    store.add(left, {**request.__dict__, "format": "mp4"})
    store.mark_running(left)  # as a killed server leaves it
    store.close()
    with make_client(tmp_path, runner, requeue=True) as client:
        assert wait_final(client, left)["state"] == "done"


def test_page_is_served(tmp_path, runner):
    with make_client(tmp_path, runner) as client:
        page = client.get("/")
        assert page.status_code == 200 and 'id="bucket"' in page.text
        assert "EventSource" in client.get("/static/app.js").text or "events" in client.get("/static/app.js").text
        assert "/v1/animations" in client.get("/openapi.json").text


def test_serve_command_refuses_bad_settings_with_exit_2(capsys):
    from cinemo_rt.cli import main

    assert main(["serve", "--max-queue", "0"]) == 2
    assert main(["serve", "--max-batch", "0"]) == 2


def test_not_ready_until_the_model_is_loaded(tmp_path, runner):
    loaded = threading.Event()

    def slow_open():
        assert loaded.wait(30)
        return runner

    settings = ServeSettings(jobs_dir=tmp_path / "jobs")
    with TestClient(create_app(settings, open_runner=slow_open)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        refused = submit(client)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        loaded.set()
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert submit(client).status_code == 202


def test_take_compatible_keeps_the_order_of_the_rest():
    from collections import deque

    from cinemo_rt.serve.batching import take_compatible

    queue = deque(["a1", "b1", "a2", "a3", "b2"])
    taken = take_compatible(queue, "a", lambda job_id: job_id[0], capacity=2)
    assert taken == ["a1", "a2"] and list(queue) == ["b1", "a3", "b2"]


# -------------------------------------------------------------------------------------------------
# POST /v1/edits
# -------------------------------------------------------------------------------------------------
EDIT = {"prompt": "a cat", "frames": "3", "steps": "2", "seed": "1", "stride": "2", "format": "gif"}


@pytest.fixture(scope="module")
def clip_gif(tmp_path_factory):
    """An 8-frame 32x32 pan rendered by the demo data's own clip renderer, as a gif."""
    from cinemo_rt.demo_data import photo, render_clip
    from cinemo_rt.video import write_video

    frames = render_clip(photo("chelsea"), "pan_left", 0.5, 8, 32, np.random.default_rng(0))
    path = tmp_path_factory.mktemp("clip") / "clip.gif"
    write_video(frames, path, fps=8, format="gif")
    return path


def submit_edit(client, video: bytes, headers=None, image=None, **fields):
    files = {"video": ("clip.gif", video, "image/gif")}
    if image is not None:
        files["image"] = ("photo.png", image, "image/png")
    return client.post("/v1/edits", data={**EDIT, **fields}, files=files, headers=headers or {})


def test_edit_job_matches_animator_edit_bit_for_bit(tmp_path, runner, clip_gif):
    from cinemo_rt.video import write_video

    photo = png_bytes()
    with make_client(tmp_path, runner) as client:
        response = submit_edit(client, clip_gif.read_bytes(), image=photo)
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["kind"] == "edit" and job["urls"]["status"] == f"/v1/edits/{job['id']}"
        assert response.headers["location"] == job["urls"]["status"]
        body = wait_final(client, job["id"])
        assert body["state"] == "done", body
        assert body["unet_calls"] == 2 * 2  # 2 inversion + 2 sampling steps, guidance 1: one row each
        served = client.get(job["urls"]["video"])
        assert served.status_code == 200 and served.headers["content-type"] == "image/gif"
        (tmp_path / "served.gif").write_bytes(served.content)

        api = Client.__new__(Client)
        api.http = client  # the Python client over the in-process app
        again = api.submit_edit(clip_gif, **{**EDIT, "format": "mp4"})  # no image: the clip's first frame
        assert api.wait(again).state == "done"
        api.download(again, tmp_path / "reconstruction.mp4")
        assert read_video(tmp_path / "reconstruction.mp4").shape == (4, 32, 32, 3)
        assert not any((tmp_path / "jobs" / "inputs").iterdir())  # uploads go once their job is done

    expected = runner.animator.edit(clip_gif, load_image(Image.open(io.BytesIO(photo))), "a cat", frames=3, steps=2, seed=1,
                                    stride=2)
    write_video(expected, tmp_path / "expected.gif", fps=8, format="gif")
    video = read_video(tmp_path / "served.gif")
    assert video.shape == (4, 32, 32, 3)
    assert np.array_equal(video, read_video(tmp_path / "expected.gif"))


def wav_bytes() -> bytes:
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(8000)
        out.writeframes(b"\0\0" * 800)
    return buffer.getvalue()


@pytest.mark.parametrize("video, fields, status, words", [
    (b"not a video at all", {}, 400, "not a readable video"),
    ("wav", {}, 400, "no video stream"),
    ("clip", {"stride": "5"}, 400, "stride 5 needs 16 frames but the clip has 8; stride 2 or less fits"),
    ("clip", {"frames": "8"}, 400, "the clip has 8 frames; the edit needs 9"),
    ("clip", {"bucket": "fast"}, 422, "bucket must be a whole number in 0..19 or auto"),
    ("clip", {"bucket": "25"}, 422, "bucket must be a whole number in 0..19"),
    ("clip", {"stride": "0"}, 422, "stride must be at least 1"),
    ("clip", {"format": "webm"}, 422, "format must be one of"),
    (b"", {}, 400, "the video field is empty"),
])
def test_bad_edits_are_refused_with_the_reason(tmp_path, runner, clip_gif, video, fields, status, words):
    data = {"wav": wav_bytes(), "clip": clip_gif.read_bytes()}.get(video, video)
    with make_client(tmp_path, runner) as client:
        response = submit_edit(client, data, **fields)
        assert response.status_code == status, response.text
        detail = str(response.json()["detail"])  # text that is no value of the field's type: FastAPI's list
        assert words in detail and str(tmp_path) not in detail  # never the server's paths
        assert not any((tmp_path / "jobs" / "inputs").iterdir())


def test_oversized_clip_and_missing_key_are_refused(tmp_path, runner, clip_gif):
    with make_client(tmp_path, runner, api_key=KEY, limits=Limits(max_video_bytes=1000)) as client:
        assert submit_edit(client, clip_gif.read_bytes()).status_code == 401
        response = submit_edit(client, clip_gif.read_bytes(), headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 413 and "limit" in response.json()["detail"]
        assert not any((tmp_path / "jobs" / "inputs").iterdir())


def test_an_edit_can_be_cancelled(tmp_path, runner, clip_gif):
    with make_client(tmp_path, runner) as client:
        job = submit_edit(client, clip_gif.read_bytes(), steps="100").json()
        while (body := client.get(job["urls"]["status"]).json())["state"] == "queued" or not body.get("step"):
            assert body["state"] in ("queued", "running"), body
            time.sleep(0.01)
        assert body["total"] == 200  # inversion and sampling steps
        assert client.delete(f"/v1/edits/{job['id']}").json()["state"] == "cancelling"  # between steps
        final = wait_final(client, job["id"])
        assert final["state"] == "cancelled" and final["error"] == "cancelled by the client"
        assert client.get(f"/v1/edits/{job['id']}/video").status_code == 409
