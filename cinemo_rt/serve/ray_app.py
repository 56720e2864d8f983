"""The same API on Ray Serve: a FastAPI ingress deployment in front of model replicas (one GPU each).

    serve run cinemo_rt.serve.ray_app:app                   # env: CINEMO_JOBS, CINEMO_CHECKPOINT, ...
    cinemo-rt serve --ray --jobs /shared/cinemo-jobs        # the same, from the CLI

Each `AnimationReplica` holds one model and runs the local `Worker` (batching, cancellation between steps)
on the jobs Ray routes to it; the ingress (`create_app` with a `RayExecutor`) stores jobs, answers status,
events and videos from the shared job store, and sends job ids to the replicas through a deployment handle.
The jobs folder must be one every replica can reach (one machine: any folder; several: a shared file system
with working POSIX locks, as SQLite needs). A replica that dies mid-job is replaced by Ray Serve; its job is
marked failed with the reason, or re-queued once when `requeue` is set: never silently lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path

from ray import serve

from .app import ServeSettings, create_app
from .batching import BatchPolicy
from .jobs import CANCELLED, FAILED, FINAL_STATES, QUEUED, JobStore
from .worker import CANCELLED_REASON, QueueFull, Worker

log = logging.getLogger(__name__)

POLL_S = 0.1
MODEL_DEPLOYMENT = "cinemo-model"
REPLICA_FAILED = "the replica running this job stopped ({error}); submit it again"


class RayExecutor:
    """The ingress side: the app's executor interface over a handle to the replicas."""

    def __init__(self, store: JobStore, handle, settings: ServeSettings):
        self.store = store
        self.handle = handle
        self.settings = settings
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.defaults = None
        self.facts = None
        self.seconds_per_job = 10.0

    def start(self, requeued=()) -> None:
        def connect():
            try:
                self.defaults = self.handle.defaults.remote().result()
                self.facts = self.handle.facts.remote().result()
            except Exception as err:  # noqa: BLE001 - reported by /readyz
                self.load_error = f"no model replica answered: {type(err).__name__}: {err}"
                log.exception("no model replica answered")
                return
            self.ready.set()
            for job_id in requeued:
                self._dispatch(job_id, attempt=1)

        threading.Thread(target=connect, daemon=True).start()

    def stop(self, timeout: float = 0) -> None:
        pass

    def queue_length(self) -> int:
        return self.store.counts()[QUEUED]

    def position(self, job_id: str) -> int | None:
        return self.store.position(job_id)

    def retry_after_s(self) -> int:
        return max(1, round(self.seconds_per_job * (self.queue_length() + 1) / self.settings.policy.max_batch))

    def check_capacity(self) -> None:
        if self.queue_length() >= self.settings.max_queue:
            raise QueueFull(self.retry_after_s())

    def submit(self, job_id: str) -> None:
        self._dispatch(job_id, attempt=0)

    def cancel(self, job_id: str) -> None:
        self.store.request_cancel(job_id)  # the replica running it stops before its next step
        job = self.store.get(job_id)
        if job is not None and job.state == QUEUED:
            self.store.finish(job_id, CANCELLED, CANCELLED_REASON)

    def _dispatch(self, job_id: str, attempt: int) -> None:
        response = self.handle.run.remote(job_id)
        threading.Thread(target=self._follow, args=(job_id, response, attempt), daemon=True).start()

    def _follow(self, job_id: str, response, attempt: int) -> None:
        """Wait for the replica's answer; a replica that died leaves its job unfinished: settle it."""
        try:
            response.result()
            return
        except Exception as err:  # noqa: BLE001 - a dead replica, a lost node, a cancelled call
            error = f"{type(err).__name__}"
        job = self.store.get(job_id)
        if job is None or job.state in FINAL_STATES:
            return
        if self.settings.requeue and attempt == 0:
            log.warning("job %s: its replica stopped (%s); running it again", job_id, error)
            self.store.requeue(job_id)
            self._dispatch(job_id, attempt=1)
        else:
            log.warning("job %s: its replica stopped (%s)", job_id, error)
            self.store.finish(job_id, FAILED, REPLICA_FAILED.format(error=error))


@serve.deployment(name=MODEL_DEPLOYMENT, health_check_period_s=5, health_check_timeout_s=30)
class AnimationReplica:
    """One model, one worker thread; Ray routes up to `max_ongoing_requests` jobs here, which batch."""

    def __init__(self, settings: ServeSettings):
        context = serve.get_replica_context()
        self.store = JobStore(settings.jobs_dir)
        self.worker = Worker(self.store, settings.open_runner, settings.policy,
                             max_queue=4 * settings.policy.max_batch, owner=context.replica_id.to_full_id_str())
        self.worker.start()
        while not self.worker.ready.wait(0.5):
            if self.worker.load_error:
                raise RuntimeError(self.worker.load_error)

    def defaults(self):
        return self.worker.defaults

    def facts(self):
        return self.worker.facts

    async def run(self, job_id: str) -> str:
        self.worker.submit(job_id)
        while True:
            job = self.store.get(job_id)
            if job is None or job.state in FINAL_STATES:
                return job.state if job else "deleted"
            await asyncio.sleep(POLL_S)

    def check_health(self) -> None:
        if not self.worker.is_alive():
            raise RuntimeError("the worker thread stopped")


def build_app(settings: ServeSettings, replicas: int = 2, min_replicas: int | None = None,
              max_replicas: int | None = None, gpus_per_replica: float | None = None):
    """The Ray Serve application: ingress + model replicas. Fixed `replicas`, or autoscaling between
    `min_replicas` and `max_replicas` (Ray Serve scales on ongoing requests per replica)."""
    if gpus_per_replica is None:
        wants_cuda = (settings.device or "").startswith("cuda")
        gpus_per_replica = 1.0 if wants_cuda else 0.0
    options = {"ray_actor_options": {"num_gpus": gpus_per_replica} if gpus_per_replica else {"num_cpus": 1},
               "max_ongoing_requests": 2 * settings.policy.max_batch}
    if min_replicas is not None or max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": min_replicas or 1, "max_replicas": max_replicas or replicas,
                                         "target_ongoing_requests": settings.policy.max_batch}
    else:
        options["num_replicas"] = replicas
    model = AnimationReplica.options(**options).bind(settings)

    def replicas_executor(store, metrics):
        # Looked up by name: Ray Serve runs the app's lifespan (which builds this) before the ingress's
        # constructor, so the handle passed to the constructor is not there yet.
        app_name = serve.get_replica_context().app_name
        return RayExecutor(store, serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name), settings)

    fastapi_app = create_app(settings, executor_factory=replicas_executor)

    @serve.deployment(name="cinemo-ingress", ray_actor_options={"num_cpus": 0.5})
    @serve.ingress(fastapi_app)
    class Ingress:
        def __init__(self, model_handle):
            fastapi_app.state.start()  # where the lifespan did not run already (it is idempotent)

    return Ingress.bind(model)


def settings_from_env() -> ServeSettings:
    """For `serve run cinemo_rt.serve.ray_app:app`: CINEMO_JOBS (required to share results: a folder every
    replica reaches), CINEMO_CHECKPOINT, CINEMO_ENGINES, CINEMO_DEVICE, CINEMO_API_KEY, CINEMO_MAX_BATCH."""
    from .keys import api_key

    env = os.environ.get
    return ServeSettings(jobs_dir=Path(env("CINEMO_JOBS", "cinemo-jobs")).resolve(),
                         checkpoint=env("CINEMO_CHECKPOINT"), engines=env("CINEMO_ENGINES"),
                         device=env("CINEMO_DEVICE"), api_key=api_key(None, os.environ),
                         policy=BatchPolicy(max_batch=int(env("CINEMO_MAX_BATCH", "4"))))


def run_ray(settings: ServeSettings, host: str, port: int, replicas: int = 2) -> int:
    """`cinemo-rt serve --ray`: joins the Ray cluster in RAY_ADDRESS (or starts a local one) and serves."""
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    settings = replace(settings, jobs_dir=Path(settings.jobs_dir).resolve())
    serve.run(build_app(settings, replicas=replicas), name="cinemo", route_prefix="/", blocking=True)
    return 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


# `serve run cinemo_rt.serve.ray_app:app`: CINEMO_REPLICAS fixed replicas (default 2), or autoscaling between
# CINEMO_MIN_REPLICAS and CINEMO_MAX_REPLICAS.
app = build_app(settings_from_env(), replicas=_env_int("CINEMO_REPLICAS") or 2,
                min_replicas=_env_int("CINEMO_MIN_REPLICAS"), max_replicas=_env_int("CINEMO_MAX_REPLICAS"))
