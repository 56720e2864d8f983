"""What a server is told at start: its jobs folder, model, key, queue, batching, limits and keep time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .batching import BatchPolicy
from .limits import Limits
from .runner import Runner


@dataclass(frozen=True)
class ServeSettings:
    jobs_dir: Path = Path("cinemo-jobs")
    checkpoint: str | None = None
    engines: str | None = None
    device: str | None = None
    dtype: str | None = None
    api_key: str | None = None
    max_queue: int = 32
    policy: BatchPolicy = field(default_factory=BatchPolicy)
    limits: Limits = field(default_factory=Limits)
    keep_s: float = 24 * 3600.0   # finished jobs and their videos are deleted after this
    requeue: bool = False         # after a restart, run interrupted jobs again instead of failing them
    exact_batching: bool = False  # True: batched videos bit-equal to running alone (fixed UNet rows; runner.py)
    threads: int | None = None    # CPU threads (None: the CLI's policy, cinemo_rt/threads.py)

    def open_runner(self) -> Runner:
        return Runner.open(self.checkpoint, self.engines, self.device, self.dtype, self.policy.max_batch,
                           self.exact_batching, self.threads)
