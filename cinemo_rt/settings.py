"""Facts of the released pipeline that the runtime, the export and the training all need, written once."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

NUM_TRAIN_TIMESTEPS = 1000  # the noise schedule's length (docs/METHOD.md, pipeline)
SIZE_FILE = "cinemo_rt.json"  # optional per-folder default size: {"height", "width", "frames"}
STEP_CACHE_KEY = "step_cache"  # key of SIZE_FILE holding the fitted step-cache indicator (fewer_calls.py)
DECODE_CHUNK = 14  # frames the temporal VAE decoder sees at a time, as the reference (14 + 2 for 16)
DCT_FRACTION = 0.23  # DCTInit's low-pass box, a fraction of each spatial side (docs/METHOD.md, DCTInit)
DCT_TAU = 975  # DCTInit's noise level of the low frequencies kept from z1 (docs/METHOD.md, DCTInit)
DEFAULT_SPAN_S = 2.0  # seconds of source clip one edit segment spans by default (its stride follows)
EDIT_DCT_TAU = 985  # the same for video editing, over the inverted latents (docs/METHOD.md, editing, `video_editing.py`)


@dataclass(frozen=True)
class Size:
    """Output size: height x width pixels and *generated* frames (the video has frames + 1, z1 first)."""

    height: int = 320
    width: int = 512
    frames: int = 15

    @classmethod
    def from_folder(cls, folder: str | os.PathLike | None) -> "Size":
        """The folder's `cinemo_rt.json` (a checkpoint's or an engines folder's), else the released size."""
        path = Path(folder) / SIZE_FILE if folder else None
        if path is None or not path.is_file():
            return cls()
        from .files import FileFormatError, read_json

        data, values = read_json(path), {}
        for key in ("height", "width", "frames"):
            if key in data:
                value = data[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise FileFormatError(f"{path}: {key} must be a whole number at least 1, got {value!r}")
                values[key] = value
        return cls(**values)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
