"""Prometheus metrics (prometheus_client, one registry per app so tests and replicas do not collide)."""

from __future__ import annotations

import resource
import sys
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _device_memory_bytes() -> float:
    """Allocated CUDA memory where a GPU runs the model, else the process's peak resident memory."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return float(torch.cuda.memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)


class _JobsByState:
    def __init__(self, counts: Callable[[], dict[str, int]]):
        self._counts = counts

    def collect(self):
        family = GaugeMetricFamily("cinemo_jobs", "jobs in the store by state", labels=["state"])
        for state, n in self._counts().items():
            family.add_metric([state], n)
        yield family


class Metrics:
    def __init__(self, queue_length: Callable[[], int], job_counts: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        Gauge("cinemo_queue_length", "jobs waiting for the worker", registry=self.registry) \
            .set_function(queue_length)
        self.registry.register(_JobsByState(job_counts))
        self.stage_seconds = Histogram("cinemo_stage_seconds", "wall time per stage (denoise: one batched step)",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.steps = Counter("cinemo_denoise_steps", "denoising steps done, counted per request",
                             registry=self.registry)
        self.unet_calls = Counter("cinemo_unet_calls", "single-image UNet calls for requests (a CFG step counts "
                                  "2; padding rows not counted)", registry=self.registry)
        self.steps_per_second = Gauge("cinemo_denoise_steps_per_second",
                                      "request-steps per second in the last batched step", registry=self.registry)
        self.batch_size = Histogram("cinemo_batch_requests", "requests per UNet call", buckets=(1, 2, 3, 4, 6, 8, 16),
                                    registry=self.registry)
        self.requests = Counter("cinemo_http_rejections", "requests refused, by HTTP status", ["status"],
                                registry=self.registry)
        Gauge("cinemo_device_memory_bytes", "CUDA memory allocated (CPU: peak resident memory)",
              registry=self.registry).set_function(_device_memory_bytes)

    def observe_step(self, requests: int, steps: int, unet_calls: int, seconds: float) -> None:
        """One batched UNet call: `steps` request-steps done (more than `requests` where a step cache skipped
        the UNet), `unet_calls` rows of requests in it."""
        self.stage_seconds.labels("denoise").observe(seconds)
        self.steps.inc(steps)
        self.unet_calls.inc(unet_calls)
        self.batch_size.observe(requests)
        if seconds > 0:
            self.steps_per_second.set(steps / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
