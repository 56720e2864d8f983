"""The embedded default checkpoint, used when the user gives no --checkpoint or --engines."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .settings import SIZE_FILE, STEP_CACHE_KEY

log = logging.getLogger(__name__)

DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "demo"
EXAMPLE_IMAGE = Path(__file__).parent / "assets" / "example.png"
TINY_DEFAULTS = {"height": 128, "width": 192, "frames": 15}
# The step cache's indicator fitted to that tiny checkpoint (seed 0) by benchmarks/calibrate_cache.py at this size
# (steps 50, 25, 12; 2 photos x 2 prompts; R^2 0.77): stored in its cinemo_rt.json like any checkpoint's.
TINY_STEP_CACHE = {"coefficients": [0.048986, 0.307483, -0.012933], "r2": 0.7674}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "cinemo-rt"


def default_checkpoint() -> Path:
    """The bundled demo checkpoint (trained with `python -m cinemo_rt.train`, see README); where a build of
    the package lacks it, a tiny random checkpoint written once to the user cache, with a warning."""
    if (DEMO_CHECKPOINT / "unet" / "config.json").is_file():
        return DEMO_CHECKPOINT
    from .testing import make_tiny_checkpoint

    folder = _cache_dir() / "tiny-random-v3"
    if not (folder / "unet" / "config.json").is_file():
        make_tiny_checkpoint(folder, seed=0)
        # A small default size keeps the untrained stand-in quick (seconds, not minutes, on a CPU).
        (folder / SIZE_FILE).write_text(json.dumps({**TINY_DEFAULTS, STEP_CACHE_KEY: TINY_STEP_CACHE}) + "\n")
    log.warning("the demo checkpoint is not bundled in this build; using an untrained tiny random "
                "checkpoint (%s): the video will be noise", folder)
    return folder
