"""The PyTorch reference backend: the checkpoint's modules, run eagerly as the original code runs."""

from __future__ import annotations

import torch

from ..checkpoint import Checkpoint
from .base import ModelInfo


class TorchBackend:
    name = "torch"

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.device = checkpoint.unet.conv_in.weight.device
        self.dtype = checkpoint.unet.dtype
        vae = checkpoint.vae
        self.info = ModelInfo(
            scaling_factor=vae.scaling_factor, temporal_vae=vae.temporal,
            text_dim=checkpoint.unet.config.cross_attention_dim,
            latent_channels=checkpoint.unet.config.in_channels,
            vae_factor=2 ** (len(vae.model.config.block_out_channels) - 1))

    @torch.no_grad()
    def unet(self, x_t, t, text, z1, motion_id):
        return self.checkpoint.unet(x_t, t, text, z1, motion_id)

    def encode_image(self, image):
        return self.checkpoint.vae.encode(image)

    def encode_text(self, ids):
        return self.checkpoint.text_encoder.encode_ids(ids)

    def decode(self, latents, chunk=14):
        return self.checkpoint.vae.decode(latents, chunk=chunk)

    def close(self) -> None:
        pass
