"""The PyTorch reference backend: the checkpoint's modules, run eagerly as the original code runs."""

from __future__ import annotations

import torch

from ..checkpoint import Checkpoint
from .base import model_info


class TorchBackend:
    name = "torch"

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.device = checkpoint.unet.conv_in.weight.device
        self.dtype = checkpoint.unet.dtype
        self.info = model_info(checkpoint)

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
