"""How many CPU threads PyTorch uses: chosen on purpose, not left to torch's default.

torch starts one intra-op thread per core it sees. On a busy machine those threads wait for each other at
every op's barrier while other processes hold the cores: the demo's denoising took 35-182 s with 2 threads
beside two competing processes, 2.8 s with 1. Small models gain nothing from a second thread even when the
machine is idle (their ops are too short to split), so the policy is:

1. `--threads N` (or `threads=` in training configs), else the `CINEMO_RT_THREADS` variable, else an
   explicit `OMP_NUM_THREADS`: the user's or CI's number wins;
2. a model under `SMALL_MODEL_PARAMETERS` parameters: 1 thread;
3. otherwise one thread per core this process may run on (`os.sched_getaffinity`, so `taskset`, cgroups'
   cpusets and container limits count), shared between the processes of one training node.

`benchmarks/cpu_threads.py` measures the choice idle and under contention.
"""

from __future__ import annotations

import logging
import os

from .limits import MAX_THREADS

log = logging.getLogger(__name__)

ENV_VAR = "CINEMO_RT_THREADS"
# Measured on the demo UNet (1.1 M parameters, 8x8 latents): 1 thread beats 2 even on an idle 2-core CPU.
# The released UNet (911 M) splits its convolutions and attention well across cores.
SMALL_MODEL_PARAMETERS = 50_000_000


def available_cores() -> int:
    """Cores this process may run on (affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def parse_threads(value: str | int | None, source: str = "--threads") -> int | None:
    """'auto', '' or None -> None (the policy decides); a positive whole number -> itself."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "0")):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be a whole number of threads or 'auto', got {value!r}") from None
    if number < 0:
        raise ValueError(f"{source} must be at least 1 (or 'auto'), got {number}")
    if number > MAX_THREADS:
        raise ValueError(f"{source} is {number}; at most {MAX_THREADS} threads (this machine lets this process "
                         f"use {available_cores()} cores; more threads than cores only wait for each other)")
    return number or None


def choose_threads(parameters: int | None, requested: int | None = None, processes: int = 1) -> tuple[int, str]:
    """-> (threads, why). `parameters`: the model's parameter count (None: unknown, treated as large);
    `processes`: how many processes of this job share the cores (training ranks on one node)."""
    if requested:  # checked here too: the Python API and the server pass numbers, not flags
        return parse_threads(requested, "threads"), "as requested"
    from_env = parse_threads(os.environ.get(ENV_VAR), ENV_VAR)
    if from_env:
        return from_env, f"from {ENV_VAR}"
    omp = parse_threads(os.environ.get("OMP_NUM_THREADS"), "OMP_NUM_THREADS")
    if omp:
        return omp, "from OMP_NUM_THREADS"
    if parameters is not None and parameters < SMALL_MODEL_PARAMETERS:
        return 1, f"small model ({parameters / 1e6:.1f} M parameters)"
    cores = max(1, available_cores() // max(1, processes))
    return cores, f"one per available core ({available_cores()} cores, {processes} process(es))"


def apply_threads(parameters: int | None, requested: int | None = None, processes: int = 1) -> int:
    """Choose and set torch's intra-op thread count; logs the choice and why. Returns it."""
    import torch

    threads, why = choose_threads(parameters, requested, processes)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.info("CPU threads: %d (%s; override with --threads or %s)", threads, why, ENV_VAR)
    return threads
