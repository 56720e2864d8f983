"""Training configuration: one frozen dataclass, read from a JSON file, then overridden by `--key value` flags.

Defaults follow the paper (Algorithm 1, section 4.1) where it says something: 16 frames, frame interval
3..10, text dropout 0.5; the rest (optimiser settings, EMA, warm-up) are ours and named here once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..schedule import PREDICTION_TYPES
from ..settings import Size


@dataclass(frozen=True)
class TrainConfig:
    # -- data ---------------------------------------------------------------------------------------
    data_dir: str = "data"                      # videos + captions.jsonl (see train/data.py)
    make_demo_data: bool = False                # write the demo dataset into data_dir if it is missing
    demo_clips: int = 600
    demo_seed: int = 0
    num_frames: int = Size.frames + 1           # frames per sample: z1 + (num_frames - 1) residual frames
    frame_interval: tuple[int, int] = (3, 10)   # inclusive range of the random frame stride (paper 4.1)
    height: int = Size.height
    width: int = Size.width
    text_dropout: float = 0.5                   # empty prompt with this probability (for guidance)
    cache_latents: bool = False                 # encode every frame once (valid: the crop is deterministic)
    # -- model --------------------------------------------------------------------------------------
    init_from: str | None = None                # checkpoint folder to fine-tune; None: from scratch
    unet: Mapping[str, Any] = field(default_factory=dict)          # UNetConfig fields (from scratch)
    vae: Mapping[str, Any] = field(default_factory=dict)           # diffusers AutoencoderKL kwargs
    text_encoder: Mapping[str, Any] = field(default_factory=dict)  # tiny CLIP: hidden, layers, heads
    vae_steps: int = 0                          # autoencoder pre-training steps (from scratch only)
    vae_lr: float = 1e-3
    vae_batch: int = 32
    vae_kl_weight: float = 1e-6
    # Std of the scaled latents (sets the VAE's scaling_factor). Larger values shift the fixed linear noise
    # schedule towards less noise. With epsilon prediction, tiny 8x8 latents at std 1 diverged in sampling (the
    # first DDIM steps amplify eps error ~100x into x0); v_prediction removes that. The demo uses 1: at 3 the
    # noisy residuals give the direction away down to high t, and the prompt was learnt far more slowly.
    latent_std: float = 1.0
    # -- optimisation -------------------------------------------------------------------------------
    steps: int = 1000
    batch_size: int = 4                         # per rank
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100                     # linear warm-up, then constant (as the original's "warmup")
    lr_schedule: str = "constant"               # after warm-up: "constant" or "cosine" (to 0 at `steps`)
    grad_clip: float = 1.0
    # UNet target: "epsilon" (the paper) or "v_prediction". None: the checkpoint's own when fine-tuning or
    # resuming, else epsilon.
    prediction_type: str | None = None
    high_noise_weight: float = 0.0              # see loop.diffusion_loss; 0 is the paper's plain eps MSE
    ema_decay: float = 0.9999
    bf16: bool = True                           # bf16 autocast on CUDA (ignored on CPU)
    gradient_checkpointing: bool = False
    seed: int = 0
    max_minutes: float = 0.0                    # stop (with a checkpoint) after this long; 0: no limit
    threads: int = 0                            # torch CPU threads per rank; 0: cinemo_rt.threads' policy
    # -- output -------------------------------------------------------------------------------------
    output_dir: str = "runs/train"
    save_every: int = 500
    log_every: int = 10
    resume: str | None = None                   # "auto" (latest in output_dir) or a checkpoint folder
    export_dir: str | None = None               # final EMA weights in the released layout go here too
    defaults: Mapping[str, Any] = field(default_factory=dict)      # extra keys for cinemo_rt.json

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("frame_interval", "betas"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_ranges(self)
        lo, hi = self.frame_interval
        if not 1 <= lo <= hi:
            raise ValueError(f"frame_interval must be (min, max) with 1 <= min <= max; got {self.frame_interval}")
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2 (z1 and at least one residual frame); got {self.num_frames}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine'; got {self.lr_schedule!r}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction'; got {self.prediction_type!r}")
        if self.init_from is None and not self.unet:
            raise ValueError("training from scratch needs a `unet` config; or set init_from to a checkpoint folder")

    @property
    def clip_span(self) -> int:
        """Frames a clip must have for the largest interval: 1 + (num_frames - 1) * max interval."""
        return 1 + (self.num_frames - 1) * self.frame_interval[1]

    @classmethod
    def from_file(cls, path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> "TrainConfig":
        values: dict[str, Any] = {}
        if path:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
            if not isinstance(values, dict):
                raise ValueError(f"{path} holds a JSON {type(values).__name__}; a training config is an object {{...}}")
        for key, value in parse_overrides(overrides).items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                value = {**values[key], **value}  # --unet.layers_per_block 2 keeps the other unet keys
            values[key] = value
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# Whole-number fields and their least value; the image and frame ceilings are the runtime's (cinemo_rt.limits).
_AT_LEAST = {"demo_clips": 1, "demo_seed": 0, "num_frames": 2, "height": 8, "width": 8, "vae_steps": 0,
             "vae_batch": 1, "steps": 0, "batch_size": 1, "warmup_steps": 0, "seed": 0, "threads": 0,
             "save_every": 1, "log_every": 1}
_FRACTIONS = ("text_dropout", "ema_decay")  # in 0..1


def check_field_types(cfg: "TrainConfig") -> None:
    """Each field's JSON type as its annotation says (`"steps": "abc"` or `"height": 1e9` is refused here,
    not met as a TypeError an hour into training); numbers finite."""
    for item in dataclasses.fields(cfg):
        value, kind = getattr(cfg, item.name), str(item.type)
        if value is None and "None" in kind:
            continue
        if kind.startswith("int") or kind.startswith("float"):
            whole = kind.startswith("int")
            ok = isinstance(value, int) if whole else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or (not whole and not math.isfinite(value)):
                raise ValueError(f"training config {item.name} must be a {'whole' if whole else 'finite'} number; "
                                 f"got {value!r}")
        elif kind.startswith("bool") and not isinstance(value, bool):
            raise ValueError(f"training config {item.name} must be true or false; got {value!r}")
        elif kind.startswith("str") and not isinstance(value, str):
            raise ValueError(f"training config {item.name} must be a string; got {value!r}")
        elif kind.startswith("Mapping") and not isinstance(value, Mapping):
            raise ValueError(f"training config {item.name} must be an object {{...}}; got {value!r}")
        elif kind.startswith("tuple"):
            number = int if "int" in kind else (int, float)
            if (not isinstance(value, (list, tuple)) or len(value) != 2
                    or any(isinstance(v, bool) or not isinstance(v, number) or not math.isfinite(v) for v in value)):
                raise ValueError(f"training config {item.name} must be a pair of numbers; got {value!r}")


MAX_MODEL_NUMBER = 4096  # widths, layers, heads of a model trained from scratch here: past it, a typo


def check_ranges(cfg: "TrainConfig") -> None:
    from ..limits import MAX_FRAMES, MAX_SIDE, MAX_THREADS

    for part in ("unet", "vae", "text_encoder"):
        for key, value in _numbers(getattr(cfg, part), part):
            if value > MAX_MODEL_NUMBER:
                raise ValueError(f"training config {key} is {value}; at most {MAX_MODEL_NUMBER} (widths, layers and "
                                 "heads of a model trained here)")

    for name, least in _AT_LEAST.items():
        if getattr(cfg, name) < least:
            raise ValueError(f"training config {name} must be at least {least}; got {getattr(cfg, name)}")
    for name, most in (("height", MAX_SIDE), ("width", MAX_SIDE), ("num_frames", MAX_FRAMES + 1),
                       ("threads", MAX_THREADS)):
        if getattr(cfg, name) > most:
            raise ValueError(f"training config {name} is {getattr(cfg, name)}; the limit is {most}")
    if cfg.height % 8 or cfg.width % 8:
        raise ValueError(f"training config height and width must be multiples of 8; got {cfg.height}x{cfg.width}")
    for name in _FRACTIONS:
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"training config {name} must be in 0..1; got {getattr(cfg, name)}")
    for name in ("lr", "vae_lr", "latent_std"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"training config {name} must be above 0; got {getattr(cfg, name)}")
    if not all(0 <= b < 1 for b in cfg.betas):
        raise ValueError(f"training config betas must be in [0, 1); got {cfg.betas}")


def _numbers(value, key: str):
    """(dotted key, number) of every whole number inside a nested config value."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield key, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{key}[{i}]")
    elif isinstance(value, Mapping):
        for k, item in value.items():
            yield from _numbers(item, f"{key}.{k}")


def parse_overrides(flags: Sequence[str]) -> dict[str, Any]:
    """`--steps 10 --lr 3e-4 --resume auto --unet.layers_per_block 2` -> dict; values parsed as JSON when
    they parse, else kept as strings. Dotted keys set one field of a nested mapping."""
    out: dict[str, Any] = {}
    items = list(flags)
    i = 0
    while i < len(items):
        key = items[i]
        if not key.startswith("--"):
            raise ValueError(f"expected --key value, got {key!r}")
        key = key[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ValueError(f"flag --{key} needs a value")
            raw = items[i + 1]
            i += 2
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if "." in key:
            outer, inner = key.split(".", 1)
            out.setdefault(outer, {})[inner] = value
        else:
            out[key] = value
    return out
