"""What a model folder can and cannot do, read from its files without loading it: the video size, the
parameter count, a closed caption vocabulary and what it was trained on.

One description for every entry point: `GET /v1/model` and the page show it, the CLI and the Python API log
its prompt warnings, and a job's status carries them. The bundled demo is a 32x32 model that knows only its
captions' words; a user should learn that before the first video, not from it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .settings import Size
from .vocabulary import caption_words, unknown_words_message

# What the bundled demo was trained on (`configs/demo.json`, `cinemo_rt/demo_data.py`; README, Training).
DEMO_TRAINING = ("1200 synthetic 32x32 clips made by cinemo_rt/demo_data.py: scikit-image's photographs and "
                 "drawn scenes panning in four directions, zooming, rotating, moving objects and stills, with "
                 "captions saying what moves and how; a demonstration of the pipeline, not the released weights")
EMPTY_PROMPT = "empty prompt: the animation is guided by the image and motion bucket only"


@dataclass(frozen=True)
class ModelFacts:
    name: str                        # "demo" (the bundled checkpoint) or the folder's name
    height: int
    width: int
    frames: int                      # generated frames; a video has frames + 1 (the input image first)
    parameters: int | None           # the UNet's, from its weights' header
    vocabulary: tuple[str, ...] | None  # the only words a closed-vocabulary tokenizer knows; None: open English
    trained_on: str | None           # cinemo_rt.json "trained_on", or the demo's description

    @classmethod
    def of_folder(cls, folder: str | os.PathLike, engines: bool = False) -> "ModelFacts":
        from .defaults import DEMO_CHECKPOINT
        from .files import read_json
        from .limits import checkpoint_estimate_inputs, engines_unet_parameters
        from .settings import SIZE_FILE

        folder = Path(folder)
        size = Size.from_folder(folder)
        is_demo = folder.resolve() == DEMO_CHECKPOINT.resolve()
        extra = read_json(folder / SIZE_FILE) if (folder / SIZE_FILE).is_file() else {}
        trained_on = extra.get("trained_on") if isinstance(extra.get("trained_on"), str) else None
        words = caption_words(folder / "tokenizer")
        return cls(name="demo" if is_demo else folder.name, height=size.height, width=size.width,
                   frames=size.frames, parameters=(engines_unet_parameters(folder) if engines
                                                   else checkpoint_estimate_inputs(folder)["parameters"]),
                   vocabulary=tuple(sorted(words)) if words is not None else None,
                   trained_on=trained_on or (DEMO_TRAINING if is_demo else None))

    def prompt_warnings(self, prompt: str, negative_prompt: str = "") -> list[str]:
        """What the model cannot read: an empty prompt, words outside a closed vocabulary."""
        warnings = [] if prompt and prompt.strip() else [EMPTY_PROMPT]
        if self.vocabulary is not None:
            message = unknown_words_message(f"{prompt} {negative_prompt}", set(self.vocabulary))
            if message:
                warnings.append(message)
        return warnings

    def as_dict(self) -> dict:
        facts = asdict(self)
        facts["vocabulary"] = list(self.vocabulary) if self.vocabulary is not None else None
        facts["video_frames"] = self.frames + 1
        return facts
