"""Training (the paper's Algorithm 1): `python -m cinemo_rt.train --config configs/demo.json`.

Modules: `config` (TrainConfig), `data` (video folder, Algorithm-1 sampling), `components` (from-scratch VAE
and text encoder), `loop` (objective, EMA, checkpoints, the loop), `dist` (torchrun helpers).
"""

from .config import TrainConfig
from .loop import diffusion_loss, train

__all__ = ["TrainConfig", "diffusion_loss", "train"]
