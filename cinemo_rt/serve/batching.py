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


def padded_rows(rows: int, max_rows: int, exact: bool) -> int:
    """The rows of a UNet call that carries `rows` real ones. Exact: always `max_rows`, so a row's result never
    depends on how many companions it has (bit-exact batching; a lone request pays for every absent row).
    Otherwise the next power of two, at most `max_rows`: a lone request pays for no padding (2 rows with CFG, 1
    without), and a compiled or graph-captured UNet sees at most log2(max_rows) + 1 batch shapes."""
    if rows < 1 or rows > max_rows:
        raise ValueError(f"a UNet call carries 1 to {max_rows} rows; got {rows}")
    return max_rows if exact else min(max_rows, 1 << (rows - 1).bit_length())
