"""The Ray Serve deployment on a local Ray instance bound to the loopback, CPU only: two replicas of the demo
model share the work, and a replica killed mid-job is replaced while its job ends failed with the reason."""

import time

import pytest

ray = pytest.importorskip("ray", reason="needs Ray Serve, not in the light `dev` install: pip install -e '.[ray]'; "
                          ".ci/run's second step installs and runs it")
pytest.importorskip("fastapi", reason="serving extras: pip install -e '.[serve]'")

from ray import serve  # noqa: E402

from cinemo_rt.defaults import EXAMPLE_IMAGE  # noqa: E402
from cinemo_rt.serve.app import ServeSettings  # noqa: E402
from cinemo_rt.serve.batching import BatchPolicy  # noqa: E402
from cinemo_rt.serve.client import Client, free_port  # noqa: E402
from cinemo_rt.serve.jobs import JobStore  # noqa: E402
from cinemo_rt.serve.ray_app import build_app  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture
def ray_url(tmp_path, monkeypatch):
    # Ray Serve kills a proxy not ready in 5 s: on a busy 2-core machine its niced workers start slower than that.
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        monkeypatch.setenv(name, "60")
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_until(condition, timeout=180, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_replicas_share_jobs_and_a_killed_replica_fails_its_job(ray_url, tmp_path):
    jobs = tmp_path / "jobs"
    settings = ServeSettings(jobs_dir=jobs, policy=BatchPolicy(max_batch=2, max_wait_ms=20))
    serve.run(build_app(settings, replicas=2), name="cinemo", route_prefix="/")
    client = Client(ray_url)
    wait_until(lambda: client.http.get("/readyz").status_code == 200, what="readyz")

    ids = []
    for seed in range(8):
        job = client.submit(EXAMPLE_IMAGE, "the camera pans left", steps=6, seed=seed)
        ids.append(job.id)
    for job_id in ids:
        assert client.wait(job_id, timeout=180).state == "done"
        assert client.video(job_id)[4:8] == b"ftyp"
    store = JobStore(jobs)
    owners = {store.get(job_id).owner for job_id in ids}
    assert len(owners) == 2, owners  # both replicas did work

    long = client.submit(EXAMPLE_IMAGE, "zooms in", steps=100, segments=8, seed=1).id
    assert client.wait(long, states=("running",), timeout=120).state == "running"
    owner = store.get(long).owner
    replica_suffix = owner.rsplit("#", 1)[-1]
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if replica_suffix in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)

    job = client.wait(long, timeout=120, check=False)
    assert job.state == "failed" and "replica" in job.error, job
    # Ray Serve starts a replacement: two healthy replicas again, and new work still completes
    wait_until(lambda: serve.status().applications["cinemo"].status == "RUNNING"
               and len({a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                        if "cinemo-model" in a["name"]} - set(names)) == 2, what="a replacement replica")
    after = client.submit(EXAMPLE_IMAGE, "the camera pans right", steps=4, seed=2).id
    assert client.wait(after, timeout=180).state == "done"
