"""The single worker thread that owns the model: a bounded queue in front, batched denoising inside.

Only this thread touches the model and the device. HTTP handlers submit job ids, read progress and ask for
cancellation; the store (SQLite) holds every state change, the worker's memory only the live step counts.

Edit jobs run un-batched, one at a time (each is its own group): the worker takes one when no animation is
active and runs `Animator.edit` through to the video (its inversion and sampling, in that order, call the
real UNet), so an edit's video is the CLI's bit for bit; queued animations wait for it and it waits for the
active ones. Cancelling stops an edit between steps, as an animation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..scale import OutputScale
from ..segments import first_frame_of_next
from ..video import write_video
from .batching import BatchPolicy, take_compatible
from .jobs import CANCELLED, DONE, EDIT, FAILED, Job, JobStore
from .metrics import Metrics
from ..request import EditRequest, Request
from .runner import Runner, Segment, batch_key

log = logging.getLogger(__name__)

FPS = 8.0
CANCELLED_REASON = "cancelled by the client"


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Cancelled(Exception):
    """Raised from an edit's step callback when its job was asked to stop."""


@dataclass
class Active:
    job_id: str
    segment: Segment
    steps_before: int   # steps and UNet calls of the job's earlier segments
    steps_total: int
    calls_before: int = 0

    @property
    def steps_done(self) -> int:
        return self.steps_before + self.segment.steps_done

    @property
    def calls(self) -> int:
        return self.calls_before + self.segment.counter.calls


class Worker:
    def __init__(self, store: JobStore, open_runner: Callable[[], Runner], policy: BatchPolicy,
                 max_queue: int, metrics: Metrics | None = None, owner: str = ""):
        self.store = store
        self.open_runner = open_runner
        self.policy = policy
        self.max_queue = max_queue
        self.metrics = metrics
        self.owner = owner
        self.queue: deque[str] = deque()
        self.cond = threading.Condition()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.runner: Runner | None = None
        self.seconds_per_job = 10.0  # running estimate, for Retry-After
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="cinemo-worker", daemon=True)
        self._keys: dict[str, tuple] = {}

    # -- called from HTTP handlers ----------------------------------------------------------------------
    def start(self, requeued: list[str] = ()) -> None:
        self.queue.extend(requeued)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self._thread.join(timeout)

    @property
    def defaults(self):
        return self.runner.defaults

    @property
    def facts(self):
        """The model's `ModelFacts` (size, vocabulary, training), once loaded."""
        return self.runner.facts

    def retry_after_s(self) -> int:
        return max(1, round(self.seconds_per_job * (len(self.queue) + 1) / self.policy.max_batch))

    def submit(self, job_id: str) -> None:
        with self.cond:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(self.retry_after_s())
            self.queue.append(job_id)
            self.cond.notify_all()

    def check_capacity(self) -> None:
        """Refuse early (before the upload is stored) when the queue is full."""
        if len(self.queue) >= self.max_queue:
            raise QueueFull(self.retry_after_s())

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def queue_length(self) -> int:
        return len(self.queue)

    def position(self, job_id: str) -> int | None:
        """1-based place in the queue, or None when not queued."""
        with self.cond:
            try:
                return self.queue.index(job_id) + 1
            except ValueError:
                return None

    def cancel(self, job_id: str) -> None:
        """A queued job leaves the queue now; a running one stops before its next denoising step (the flag is
        in the store, so whichever worker runs the job sees it)."""
        with self.cond:
            if job_id in self.queue:
                self.queue.remove(job_id)
                self.store.finish(job_id, CANCELLED, CANCELLED_REASON)
            else:
                self.store.request_cancel(job_id)

    # -- the thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.runner = self.open_runner()
        except Exception as err:  # noqa: BLE001 - reported by /readyz and the log, the server stays up
            log.exception("the model could not be loaded")
            self.load_error = f"{type(err).__name__}: {err}"
            return
        self.ready.set()
        try:
            self._loop()
        except Exception as err:  # noqa: BLE001 - the thread ends: /readyz and new requests say so (503)
            log.exception("the worker stopped")
            self.load_error = f"the worker stopped: {type(err).__name__}: {err}"

    def _loop(self) -> None:
        active: list[Active] = []
        while True:
            edit = None
            with self.cond:
                if not active:
                    while not self.queue and not self._stop:
                        self.cond.wait()
                    if self._stop:
                        return
                    first = self.queue.popleft()
                    admitted = [first]
                    key = self._key(first)
                    if key is None:
                        admitted = []
                    elif key[0] == EDIT:
                        edit, admitted = first, []
                    elif self.policy.max_batch > 1 and self.policy.max_wait_ms > 0:
                        deadline = time.monotonic() + self.policy.max_wait_ms / 1000
                        while (len(admitted) < self.policy.max_batch and not self._stop
                               and time.monotonic() < deadline):
                            admitted += take_compatible(self.queue, key, self._key,
                                                        self.policy.max_batch - len(admitted))
                            if len(admitted) < self.policy.max_batch:
                                self.cond.wait(max(0.0, deadline - time.monotonic()))
                else:
                    if self._stop:
                        return
                    key = batch_key(active[0].segment.request)
                    admitted = take_compatible(self.queue, key, self._key, self.policy.max_batch - len(active))
            if edit is not None:
                self._run_edit(edit)
                continue
            active += [a for a in (self._admit(job_id) for job_id in admitted) if a is not None]
            active = self._drop_cancelled(active)
            if active:
                active = self._step(active)

    def _key(self, job_id: str) -> tuple | None:
        if job_id not in self._keys:
            job = self.store.get(job_id)
            if job is None:
                return None
            if job.kind == EDIT:  # an edit's key is its own: it never shares a group
                self._keys[job_id] = (EDIT, job_id)
            else:
                try:
                    self._keys[job_id] = batch_key(Request.from_dict(job.request))
                except ValueError as err:  # stored by a version that allowed what this one refuses
                    if self._start(job_id) is not None:
                        self._fail(job_id, err)
                    return None
        return self._keys[job_id]

    def _admit(self, job_id: str) -> Active | None:
        job = self._start(job_id)
        if job is None:
            return None
        request = Request.from_dict(job.request)
        self.store.set_progress([(job_id, 0, request.steps * request.segments, 0)])
        started = time.perf_counter()
        try:
            image = self.runner.check_image(self.store.input_path(job_id))
            segment = self.runner.prepare(image, request)
        except Exception as err:  # noqa: BLE001 - the job fails with the reason, the server goes on
            self._fail(job_id, err)
            return None
        self._observe("prepare", started)
        return Active(job_id, segment, 0, request.steps * request.segments)

    def _drop_cancelled(self, active: list[Active]) -> list[Active]:
        cancelled = self.store.cancel_requested([a.job_id for a in active])
        for a in active:
            if a.job_id in cancelled:
                self.runner.abandon(a.segment)
                self.store.finish(a.job_id, CANCELLED, CANCELLED_REASON)
                self._forget(a.job_id)
        return [a for a in active if a.job_id not in cancelled]

    def _step(self, active: list[Active]) -> list[Active]:
        started = time.perf_counter()
        steps_before, rows = sum(a.steps_done for a in active), sum(a.segment.rows for a in active)
        try:
            self.runner.step([a.segment for a in active])
        except Exception as err:  # noqa: BLE001
            log.exception("a denoising step failed")
            for a in active:
                self.runner.abandon(a.segment)
                self._fail(a.job_id, err)
            return []
        if self.metrics:
            steps = sum(a.steps_done for a in active) - steps_before
            self.metrics.observe_step(len(active), steps, rows, time.perf_counter() - started)
        self.store.set_progress([(a.job_id, a.steps_done, a.steps_total, a.calls) for a in active])
        still = []
        for a in active:
            if not a.segment.done:
                still.append(a)
                continue
            next_active = self._end_segment(a)
            if next_active is not None:
                still.append(next_active)
        return still

    def _end_segment(self, a: Active) -> Active | None:
        try:
            started = time.perf_counter()
            video = self.runner.finish(a.segment)
            self._observe("decode", started)
            frames = self.runner.join(a.segment, video)
            request = a.segment.request
            if a.segment.segment + 1 < request.segments:
                segment = self.runner.prepare(first_frame_of_next(video), request, a.segment.segment + 1,
                                              frames)
                return Active(a.job_id, segment, a.steps_done, a.steps_total, a.calls)
            self._write(a.job_id, np.concatenate(frames))
        except Exception as err:  # noqa: BLE001
            self._fail(a.job_id, err)
            return None
        self._forget(a.job_id)
        return None

    def _write(self, job_id: str, video: np.ndarray) -> None:
        """The finished video to the store, and the job done (unless deleted or cancelled meanwhile)."""
        started = time.perf_counter()
        job = self.store.get(job_id)
        if job is None:  # deleted meanwhile
            return
        write_video(video, self.store.video_path(job), fps=FPS, format=job.format,
                    scale=OutputScale(job.request.get("scale", 1), job.request.get("scale_filter", "nearest")))
        self._observe("write", started)
        if self.store.finish(job_id, DONE):
            self._update_estimate(job)
        else:  # cancelled while decoding: the video must not outlive its job
            self.store.video_path(job).unlink(missing_ok=True)

    def _run_edit(self, job_id: str) -> None:
        """One edit job start to end (its own group, see the module docstring). Progress counts inversion and
        sampling steps (2 x steps x segments); the UNet calls are reported once it is done."""
        job = self._start(job_id)
        if job is None:
            return
        request = EditRequest.from_dict(job.request)
        total, done = 2 * request.steps * request.segments, 0

        def on_step(i: int, t: int, x) -> None:
            nonlocal done
            done += 1
            if self.store.cancel_requested([job_id]):
                raise Cancelled()
            self.store.set_progress([(job_id, done, total, 0)])

        self.store.set_progress([(job_id, 0, total, 0)])
        try:
            image_path = self.store.input_path(job_id)
            image = self.runner.check_image(image_path) if image_path.is_file() else None
            video = self.runner.edit(self.store.clip_path(job_id), image, request, on_step)
            self.store.set_progress([(job_id, done, total, self.runner.animator.last_unet_calls)])
            self._write(job_id, video)
        except Cancelled:
            self.store.finish(job_id, CANCELLED, CANCELLED_REASON)
        except Exception as err:  # noqa: BLE001 - the job fails with the reason, the server goes on
            self._fail(job_id, err)
            return
        self._forget(job_id)

    def _start(self, job_id: str) -> Job | None:
        """Mark a queued job running; None when it is gone, no longer queued, or cancelled before it ran."""
        job = self.store.get(job_id)
        if job is None or job.state != "queued":
            self._forget(job_id)
            return None
        if job.cancel:
            self.store.finish(job_id, CANCELLED, CANCELLED_REASON)
            self._forget(job_id)
            return None
        self.store.mark_running(job_id, self.owner)
        return job

    def _fail(self, job_id: str, err: Exception) -> None:
        reason = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
        log.warning("job %s failed: %s", job_id, reason)
        self.store.finish(job_id, FAILED, reason)
        self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        self._keys.pop(job_id, None)

    def _observe(self, stage: str, started: float) -> None:
        if self.metrics:
            self.metrics.stage_seconds.labels(stage).observe(time.perf_counter() - started)

    def _update_estimate(self, job) -> None:
        if job.started:
            self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (time.time() - job.started)
