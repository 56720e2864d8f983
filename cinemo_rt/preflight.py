"""Everything `cinemo-rt run` can check before importing torch or PyAV: the image,
the model folder, the output size against ceilings and the memory available, and the prompt's words.

Bad input used to be reported only after 7.6 s of imports (30-80 s on a busy machine); these checks read
headers and JSON files and take milliseconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .image import InputError, load_image
from .settings import Size
from .limits import (check_job_size, check_scaled_size, checkpoint_estimate_inputs, engines_unet_parameters,
                     size_defaults)
from .model_facts import ModelFacts

log = logging.getLogger(__name__)

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass
class RunPlan:
    folder: Path               # the checkpoint or engines folder that will be loaded
    engines: bool
    image: np.ndarray | None   # RGB uint8, decoded once (None: `edit` without --image)
    parameters: int | None     # the UNet's parameter count where its header says (chooses CPU threads)
    size: Size                 # the output size: the flags, else the folder's defaults


def model_folder(args) -> tuple[Path, bool]:
    """(folder, is_engines) of a run: --engines, --checkpoint, or the bundled demo."""
    if args.engines:
        return Path(args.engines), True
    if args.checkpoint:
        return Path(args.checkpoint), False
    from .defaults import default_checkpoint

    folder = default_checkpoint()
    log.info("no --checkpoint or --engines given: using the embedded demo checkpoint %s", folder)
    return Path(folder), False


def runs_on_cpu(device: str | None) -> bool:
    """Without importing torch: an explicit CPU device, or no NVIDIA device on this machine."""
    if device is not None:
        return device.startswith("cpu")
    return not any(Path("/dev").glob("nvidia[0-9]*"))


def plan_run(args, request) -> RunPlan:
    """The run's model folder, image and size, checked against the folder's ceilings and memory; `request`
    (a `Request` or `EditRequest`, its values checked already) gives the size, else the folder does."""
    folder, engines = model_folder(args)
    flag = "--engines" if engines else "--checkpoint"
    if not folder.is_dir():
        raise InputError(f"{flag} folder {str(folder)!r} does not exist or is not a folder")
    image = load_image(args.image) if args.image is not None else None
    defaults = size_defaults(folder)
    height, width = request.height or defaults["height"], request.width or defaults["width"]
    frames = request.frames or defaults["frames"]
    check_job_size(folder, height, width, frames, request.segments, engines=engines,
                   dtype_bytes=DTYPE_BYTES.get(args.dtype or "fp32", 4), on_cpu=runs_on_cpu(args.device),
                   defaults=defaults)
    parameters = engines_unet_parameters(folder) if engines else checkpoint_estimate_inputs(folder)["parameters"]
    scale = getattr(args, "scale", None)
    if scale is not None:
        check_scaled_size(height, width, scale)
    for message in ModelFacts.of_folder(folder, engines).prompt_warnings(request.prompt, request.negative_prompt):
        log.warning("%s", message)
    return RunPlan(folder=folder, engines=engines, image=image, parameters=parameters,
                   size=Size(height, width, frames))
