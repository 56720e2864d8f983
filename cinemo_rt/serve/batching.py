"""Which requests share a UNet call: plain functions over the queue, no threads or model here.

Policy: the worker keeps a set of active requests that all share one batch key (latent shape, steps, sampler),
at most `max_batch` of them. Between steps it admits queued requests with the same key (continuous batching:
a newcomer joins at its own step 0, the UNet takes a timestep per row). When idle, it takes the oldest queued
request and waits up to `max_wait_ms` for companions before the first step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Hashable


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 4          # requests per UNet call; 1 turns batching off
    max_wait_ms: float = 50.0   # how long an idle worker waits for companions of the first request

    def __post_init__(self):
        if self.max_batch < 1 or self.max_wait_ms < 0:
            raise ValueError("max batch must be at least 1 and max wait at least 0 ms")


def take_compatible(queue: deque, key: Hashable, key_of: Callable[[str], Hashable], capacity: int) -> list[str]:
    """Remove and return up to `capacity` queued ids whose key equals `key`, oldest first; others keep
    their order."""
    taken, kept = [], deque()
    while queue:
        job_id = queue.popleft()
        if len(taken) < capacity and key_of(job_id) == key:
            taken.append(job_id)
        else:
            kept.append(job_id)
    queue.extend(kept)
    return taken
