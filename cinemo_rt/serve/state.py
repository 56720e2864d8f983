"""The server's state, kept on `app.state.server`: the settings, and once started the job store, the
executor (the local `Worker`, or Ray replicas) and the metrics. The routes read it through `dependencies.py`."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from .config import ServeSettings
from .jobs import JobStore, started_in_process
from .limits import job_sizer
from .metrics import Metrics
from .runner import Runner
from .worker import Worker

log = logging.getLogger(__name__)


class ServerState:
    """`open_runner` replaces loading the model from the settings (tests share one); `executor_factory(store,
    metrics) -> executor` replaces the local worker (Ray uses this). `store`, `executor` and `metrics` are None
    until `start`."""

    def __init__(self, settings: ServeSettings, open_runner: Callable[[], Runner] | None = None,
                 executor_factory: Callable | None = None):
        self.settings = settings
        self.sizing = job_sizer(settings.checkpoint, settings.engines, settings.dtype, settings.device)
        self.folder_key = str(Path(settings.jobs_dir).resolve())  # resolved once, where the app is built
        self._open_runner = open_runner
        self._executor_factory = executor_factory
        self.store: JobStore | None = None
        self.executor = None
        self.metrics: Metrics | None = None
        self.stop_sweep: threading.Event | None = None

    def _local_worker(self, store: JobStore, metrics: Metrics) -> Worker:
        settings = self.settings
        return Worker(store, self._open_runner or settings.open_runner, settings.policy, settings.max_queue, metrics)

    def start(self) -> None:
        """Open the store, settle jobs a previous run left behind, start the executor and the expiry sweep.
        Idempotent: the lifespan calls it, and so does a Ray Serve ingress (which may not run lifespans). Ray
        unpickles the app twice in the ingress process (the ASGI app and the ingress's own reference), each
        copy with its own `ServerState`: the second copy adopts the first's store and executor, since the
        process owns the folder once."""
        started, lock = started_in_process()
        with lock:
            if self.store is not None:
                return
            owner = started.get(self.folder_key)
            if owner is not None:
                self._adopt(owner)
                return
            self._start()
            started[self.folder_key] = self

    def stop(self) -> None:
        started, lock = started_in_process()
        with lock:
            if self.store is None:
                return
            if started.get(self.folder_key) is not self:  # a copy that adopted the running one: the owner stops it
                self._forget()
                return
            del started[self.folder_key]
        self.stop_sweep.set()
        self.executor.stop()
        self.store.close()
        self._forget()

    def _start(self) -> None:
        settings = self.settings
        store = JobStore(settings.jobs_dir, owner=True)
        try:
            requeued = store.recover(requeue=settings.requeue)
            store.expire(settings.keep_s)
            metrics = Metrics(lambda: self.executor.queue_length(), store.counts)
            executor = (self._executor_factory or self._local_worker)(store, metrics)
        except BaseException:
            store.close()  # the folder's lock goes with it: a retried start can take it
            raise
        stop_sweep = threading.Event()
        self.store, self.metrics, self.executor, self.stop_sweep = store, metrics, executor, stop_sweep
        executor.start(requeued)
        threading.Thread(target=_sweep, args=(store, settings.keep_s, stop_sweep), daemon=True).start()

    def _adopt(self, owner: ServerState) -> None:
        self.store, self.metrics, self.executor, self.stop_sweep = (owner.store, owner.metrics, owner.executor,
                                                                    owner.stop_sweep)

    def _forget(self) -> None:
        self.store = self.metrics = self.executor = self.stop_sweep = None


def _sweep(store: JobStore, keep_s: float, stop: threading.Event) -> None:
    interval = max(1.0, min(60.0, keep_s / 4))
    while not stop.wait(interval):
        try:
            if removed := store.expire(keep_s):
                log.info("expired %d finished jobs", removed)
        except Exception:  # noqa: BLE001 - the next sweep tries again
            log.exception("expiring old jobs failed")
