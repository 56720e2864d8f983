"""Hostile input and faults against the server (docs/RELIABILITY.md): one owner per jobs folder, nothing lost
or orphaned, non-finite numbers refused before anything is stored, a dead worker reported, a server that
cannot work refused at start with one message, and keys compared as RFC 7235 and UTF-8 say.

Most tests run the app with `IdleExecutor` (accepts jobs, never runs the model): they are about the HTTP
layer and the store, and take milliseconds each.
"""

from __future__ import annotations

import io
import os
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serving extras: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from cinemo_rt import cli  # noqa: E402
from cinemo_rt.serve import jobs  # noqa: E402
from cinemo_rt.serve.app import ServeSettings, create_app  # noqa: E402
from cinemo_rt.serve.batching import BatchPolicy  # noqa: E402
from cinemo_rt.serve.jobs import JobStore, StorageError, new_job_id  # noqa: E402
from cinemo_rt.serve.worker import QueueFull, Worker  # noqa: E402
from cinemo_rt.defaults import default_checkpoint  # noqa: E402
from cinemo_rt.model_facts import ModelFacts  # noqa: E402
from cinemo_rt.settings import Size  # noqa: E402

KEY = "s3cret-key"


class IdleExecutor:
    """The executor interface (`Worker`'s) without a model: jobs are queued and stay queued."""

    def __init__(self, store, metrics, max_queue: int = 1000):
        self.store, self.queue, self.max_queue = store, [], max_queue
        self.ready = threading.Event()
        self.ready.set()
        self.load_error = None
        self.defaults = Size(32, 32, 8)
        self.facts = ModelFacts.of_folder(default_checkpoint())  # the demo's, as the page and /v1/model show

    def start(self, requeued=()):
        self.queue.extend(requeued)

    def stop(self):
        pass

    def is_alive(self):
        return True

    def check_capacity(self):
        if len(self.queue) >= self.max_queue:
            raise QueueFull(1)

    def submit(self, job_id):
        self.check_capacity()
        self.queue.append(job_id)

    def queue_length(self):
        return len(self.queue)

    def position(self, job_id):
        return self.queue.index(job_id) + 1 if job_id in self.queue else None

    def cancel(self, job_id):
        if job_id in self.queue:
            self.queue.remove(job_id)
            self.store.finish(job_id, jobs.CANCELLED, "cancelled")
        else:
            self.store.request_cancel(job_id)


def idle_app(jobs_dir: Path, **settings):
    return create_app(ServeSettings(jobs_dir=jobs_dir, **settings), executor_factory=IdleExecutor)


def png_bytes(size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def gif_bytes(frames=4, size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    images = [Image.fromarray(np.full((size[1], size[0], 3), 40 * i % 256, np.uint8)) for i in range(frames)]
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=100)
    return buffer.getvalue()


def stored(jobs_dir: Path) -> tuple[list, list]:
    """(job rows, files under inputs/): what a refused request must not leave."""
    with sqlite3.connect(jobs_dir / "jobs.sqlite3") as db:
        rows = db.execute("SELECT id FROM jobs").fetchall()
    return rows, sorted(p.name for p in (jobs_dir / "inputs").iterdir())


# ---------------------------------------------------------------------------------------------
# One folder, one owner; nothing lost or orphaned
# ---------------------------------------------------------------------------------------------
def test_a_second_server_on_one_jobs_folder_is_refused_naming_the_owner(tmp_path, capsys, caplog):
    with TestClient(idle_app(tmp_path / "jobs")):
        with pytest.raises(StorageError, match=r"in use by another server \(pid \d+"):
            JobStore(tmp_path / "jobs", owner=True)
        with caplog.at_level("ERROR"):
            assert cli.main(["serve", "--jobs", str(tmp_path / "jobs")]) == 2
        assert "in use by another server" in caplog.text and "Traceback" not in caplog.text
    JobStore(tmp_path / "jobs", owner=True).close()  # released with its owner


def test_a_restart_removes_what_a_dead_owner_left(tmp_path):
    store = JobStore(tmp_path, owner=True)
    waiting = new_job_id()
    store.add(waiting, {"format": "mp4", "prompt": "x"})
    store.input_path(waiting).write_bytes(b"png")
    store.close()
    leftovers = [tmp_path / "inputs" / ".upload-abc.png", tmp_path / "videos" / f".{new_job_id()}.mp4.x1.tmp",
                 tmp_path / "inputs" / f"{new_job_id()}.png", tmp_path / "videos" / f"{new_job_id()}.mp4"]
    for path in leftovers:
        path.write_bytes(b"half")
    (tmp_path / "videos" / ".frames.tmp").mkdir()
    JobStore(tmp_path, owner=True).close()
    assert not any(p.exists() for p in leftovers) and not (tmp_path / "videos" / ".frames.tmp").exists()
    assert (tmp_path / "inputs" / f"{waiting}.png").is_file()  # a waiting job's input is kept


def test_a_locked_database_gets_503_and_leaves_no_upload(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "BUSY_TIMEOUT_S", 0.2)
    with TestClient(idle_app(tmp_path / "jobs")) as client:
        other = sqlite3.connect(tmp_path / "jobs" / "jobs.sqlite3", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            response = client.post("/v1/animations", data={"prompt": "x"},
                                   files={"image": ("a.png", png_bytes(), "image/png")})
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert response.status_code == 503 and response.headers["retry-after"], response.text
        assert not list((tmp_path / "jobs" / "inputs").iterdir())
        assert client.post("/v1/animations", data={"prompt": "x"},
                           files={"image": ("a.png", png_bytes(), "image/png")}).status_code == 202


# ---------------------------------------------------------------------------------------------
# Non-finite numbers and sizes: refused before anything is stored
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields", [
    {"motion_id": "NaN"}, {"motion_id": "Infinity"}, {"motion_id": "-inf"}, {"guidance": "nan"},
    {"cache": "inf"}, {"guidance_until": "nan"}, {"frames": "8192", "height": "16", "width": "16"},
    {"frames": "36864", "height": "8", "width": "8"}, {"segments": "100000000"}, {"seed": str(2**80)},
    {"prompt": "a\x00b"},
])
def test_animation_fields_are_validated_before_anything_is_stored(tmp_path, fields):
    with TestClient(idle_app(tmp_path / "jobs")) as client:
        response = client.post("/v1/animations", data={"prompt": "x", **fields},
                               files={"image": ("a.png", png_bytes(), "image/png")})
        assert response.status_code == 422, response.text
        assert "Traceback" not in response.text
        assert stored(tmp_path / "jobs") == ([], [])


@pytest.mark.parametrize("fields", [
    {"motion_id": "NaN"}, {"start": "inf"}, {"start": "1e308"}, {"inversion_guidance": "nan"},
    {"frames": "8192", "height": "16", "width": "16"},
])
def test_edit_fields_are_validated_before_anything_is_stored(tmp_path, fields):
    with TestClient(idle_app(tmp_path / "jobs")) as client:
        response = client.post("/v1/edits", data={"prompt": "x", "stride": "1", "frames": "2", **fields},
                               files={"video": ("a.gif", gif_bytes(), "image/gif")})
        assert 400 <= response.status_code < 500, response.text
        assert stored(tmp_path / "jobs") == ([], [])


def test_uploads_of_wide_images_are_decoded_not_whitened(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 48), 30000, np.uint16)).save(buffer, "PNG")
    with TestClient(idle_app(tmp_path / "jobs")) as client:
        response = client.post("/v1/animations", data={"prompt": "x"},
                               files={"image": ("a.png", buffer.getvalue(), "image/png")})
        assert response.status_code == 202, response.text
        saved = np.asarray(Image.open(tmp_path / "jobs" / "inputs" / f"{response.json()['id']}.png"))
        assert int(saved[0, 0, 0]) == round(30000 / 257)


# ---------------------------------------------------------------------------------------------
# A worker that stops, and a server that cannot work
# ---------------------------------------------------------------------------------------------
def test_readyz_reports_a_dead_worker_and_requests_get_503(tmp_path):
    runner = SimpleNamespace(defaults=Size(32, 32, 8))
    settings = ServeSettings(jobs_dir=tmp_path / "jobs", policy=BatchPolicy(2, 1e300))  # a timer that overflows
    with TestClient(create_app(settings, open_runner=lambda: runner)) as client:
        worker: Worker = client.app.state.server.executor
        assert worker.ready.wait(10)
        first = client.post("/v1/animations", data={"prompt": "x"}, files={"image": ("a.png", png_bytes(), "image/png")})
        assert first.status_code == 202
        worker._thread.join(10)
        assert not worker.is_alive()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "worker stopped" in ready.json()["reason"]
        again = client.post("/v1/animations", data={"prompt": "x"}, files={"image": ("a.png", png_bytes(), "image/png")})
        assert again.status_code == 503


@pytest.mark.parametrize("argv, fragment", [
    (["--max-wait-ms", "inf"], "--max-wait-ms must be in"),
    (["--max-wait-ms", "nan"], "--max-wait-ms must be in"),
    (["--keep-hours", "nan"], "--keep-hours must be in"),
    (["--port", "99999"], "--port must be in 1..65535"),
    (["--max-batch", "0"], "--max-batch must be in"),
    (["--api-key", ""], "--api-key is empty"),
    (["--api-key", "   "], "--api-key is empty"),
    (["--api-key", "key\n"], "control characters"),
])
def test_serve_refuses_options_it_cannot_work_with(argv, fragment, tmp_path, caplog):
    with caplog.at_level("ERROR"):
        assert cli.main(["serve", "--jobs", str(tmp_path / "jobs"), *argv]) == 2
    assert fragment in caplog.text and "Traceback" not in caplog.text


def test_serve_refuses_an_empty_key_from_the_environment_and_bad_threads(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("CINEMO_API_KEY", "")
    with caplog.at_level("ERROR"):
        assert cli.main(["serve", "--jobs", str(tmp_path / "jobs")]) == 2
    assert "CINEMO_API_KEY is empty" in caplog.text
    monkeypatch.delenv("CINEMO_API_KEY")
    monkeypatch.setenv("CINEMO_RT_THREADS", "abc")
    caplog.clear()
    with caplog.at_level("ERROR"):
        assert cli.main(["serve", "--jobs", str(tmp_path / "jobs")]) == 2
    assert "CINEMO_RT_THREADS must be a whole number" in caplog.text


def broken_storage(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / "jobs"
    if kind == "file":
        folder.write_text("not a folder")
    elif kind == "corrupt":
        folder.mkdir()
        (folder / "jobs.sqlite3").write_bytes(b"this is not an SQLite database" * 100)
    elif kind == "truncated":
        JobStore(folder).close()
        with sqlite3.connect(folder / "jobs.sqlite3") as db:
            db.execute("PRAGMA journal_mode=DELETE")
            db.executemany("INSERT INTO jobs (id, state, request, created) VALUES (?, 'done', ?, 0)",
                           [(new_job_id(), "x" * 2000) for _ in range(50)])
        data = (folder / "jobs.sqlite3").read_bytes()
        (folder / "jobs.sqlite3").write_bytes(data[: len(data) // 2])
        for extra in ("jobs.sqlite3-wal", "jobs.sqlite3-shm"):
            (folder / extra).unlink(missing_ok=True)
    return folder


@pytest.mark.parametrize("kind, fragment", [("file", "cannot be used"), ("corrupt", "is damaged"),
                                            ("truncated", "is damaged")])
def test_broken_storage_at_start_is_one_message(tmp_path, kind, fragment, caplog):
    folder = broken_storage(tmp_path, kind)
    with caplog.at_level("ERROR"):
        assert cli.main(["serve", "--jobs", str(folder)]) == 2
    assert fragment in caplog.text and "Traceback" not in caplog.text, caplog.text


@pytest.mark.skipif(os.geteuid() == 0,
                    reason="root writes through read-only modes; runs as any other user (e.g. a developer's CI)")
def test_read_only_storage_at_start_is_one_message(tmp_path, caplog):
    JobStore(tmp_path / "jobs").close()
    (tmp_path / "jobs" / "jobs.sqlite3").chmod(0o444)
    (tmp_path / "jobs").chmod(0o555)
    try:
        with caplog.at_level("ERROR"):
            assert cli.main(["serve", "--jobs", str(tmp_path / "jobs")]) == 2
        assert "cannot be used" in caplog.text and "Traceback" not in caplog.text
    finally:
        (tmp_path / "jobs").chmod(0o755)


def test_the_database_being_damaged_is_reported_by_the_store(tmp_path):
    folder = broken_storage(tmp_path, "corrupt")
    with pytest.raises(StorageError, match="move it aside"):
        JobStore(folder, owner=True)


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [KEY, "ключ-🔑"])
def test_keys_compare_as_utf8_and_schemes_in_any_case(tmp_path, key):
    with TestClient(idle_app(tmp_path / "jobs", api_key=key)) as client:
        raw = key.encode("utf-8")

        def status(headers):
            return client.get("/v1/animations/" + "0" * 32, headers=headers).status_code

        for scheme in (b"Bearer", b"bearer", b"BEARER", b"bEaReR"):
            assert status({"Authorization": scheme + b" " + raw}) == 404  # authorised; no such job
        assert status({"X-API-Key": raw}) == 404
        assert status({"Authorization": raw}) == 401  # a bare key has no scheme (RFC 7235): X-API-Key takes it
        assert status({"Authorization": b"Basic " + raw}) == 401
        assert status({"Authorization": b"Bearer " + raw + b"x"}) == 401
        assert status({}) == 401


def test_an_empty_key_is_refused_by_every_entry_point(tmp_path):
    from cinemo_rt.serve.keys import api_key

    with pytest.raises(ValueError, match="empty"):
        idle_app(tmp_path / "jobs", api_key="")  # Python: create_app (the Ray ingress builds the same app)
    with pytest.raises(ValueError, match="CINEMO_API_KEY is empty"):
        api_key(None, {"CINEMO_API_KEY": " "})  # the environment of `serve` and `serve run ...ray_app:app`
    assert api_key(None, {}) is None and api_key("k", {"CINEMO_API_KEY": "other"}) == "k"


def test_two_copies_of_one_app_in_a_process_share_the_owner(tmp_path):
    """Ray unpickles the app twice in its ingress process: the second start adopts the first's store."""
    app, other = idle_app(tmp_path / "jobs"), idle_app(tmp_path / "jobs")
    app.state.start()
    try:
        other.state.start()  # no "in use by another server": this process owns the folder
        assert other.state.server.store is app.state.server.store
        other.state.stop()  # the adopter leaves the owner running
        assert app.state.server.store.counts() is not None
    finally:
        app.state.stop()
    JobStore(tmp_path / "jobs", owner=True).close()  # released
