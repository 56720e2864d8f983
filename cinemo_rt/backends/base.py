"""The backend protocol: the four component calls the pipeline makes, whatever runs them.

A backend is chosen once, when an `Animator` is built; the denoising loop only ever sees `backend.unet`
(the UNet forward contract), so no backend flag is ever tested inside the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline must know about the checkpoint behind a backend."""

    scaling_factor: float = 0.18215
    temporal_vae: bool = True  # SVD temporal decoder: decode in chunks, uint8 by truncation
    text_dim: int = 768
    latent_channels: int = 4
    vae_factor: int = 8
    prediction_type: str = "epsilon"  # what the UNet returns: "epsilon" (Cinemo) or "v_prediction"


class Backend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype  # the dtype of latents the UNet consumes
    info: ModelInfo

    def unet(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, z1: torch.Tensor,
             motion_id: torch.Tensor) -> torch.Tensor:
        """(B,4,F,h,w), (B,) long, (B,77,D), (B,4,1,h,w), (B,) float -> eps (B,4,F,h,w)."""

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,3,H,W) in [-1,1] -> posterior mean and std (B,4,H/8,W/8), unscaled."""

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """token ids (B,77) -> CLIP last hidden state (B,77,D)."""

    def decode(self, latents: torch.Tensor, chunk: int | None = 14) -> torch.Tensor:
        """scaled latents (B,4,F,h,w) -> images (B,3,F,H,W) in about [-1,1]."""

    def close(self) -> None: ...


def model_info(checkpoint) -> ModelInfo:
    """The facts above, read off a loaded `Checkpoint` (the engines folder records the same in its manifest)."""
    vae, unet = checkpoint.vae, checkpoint.unet
    return ModelInfo(scaling_factor=vae.scaling_factor, temporal_vae=vae.temporal,
                     text_dim=unet.config.cross_attention_dim, latent_channels=unet.config.in_channels,
                     vae_factor=2 ** (len(vae.model.config.block_out_channels) - 1),
                     prediction_type=checkpoint.scheduler_config.get("prediction_type", "epsilon"))
