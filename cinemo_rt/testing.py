"""Tiny, deterministic checkpoints in the released layout, so every test can run the whole system on a CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint import Checkpoint, default_scheduler_config, save_checkpoint
from .components import VAE
from .model import UNet3D, UNetConfig, tiny_config
from .small_clip import DEFAULT_WORDS, tiny_text_encoder, write_tokenizer


def tiny_temporal_vae():
    """SVD-style temporal VAE at minimum width; 4 levels keep the real 8x downsampling."""
    from diffusers import AutoencoderKLTemporalDecoder

    return AutoencoderKLTemporalDecoder(
        down_block_types=("DownEncoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        latent_channels=4, sample_size=64, scaling_factor=0.18215)


def tiny_sd_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
        sample_size=64, scaling_factor=0.18215)


def make_tiny_components(seed: int = 0, unet_config: UNetConfig | None = None,
                         words: Iterable[str] = DEFAULT_WORDS, temporal_vae: bool = True,
                         workdir: str | os.PathLike | None = None) -> Checkpoint:
    """In-memory tiny checkpoint with deterministic random weights (all output layers non-zero)."""
    import tempfile

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        text = tiny_text_encoder(write_tokenizer(Path(tmp) / "tokenizer", words))
    config = unet_config or tiny_config(cross_attention_dim=text.hidden_size)
    unet = UNet3D(config).eval()
    _randomize_zero_layers(unet, seed)
    vae_model = tiny_temporal_vae() if temporal_vae else tiny_sd_vae()
    return Checkpoint(unet=unet, vae=VAE.create(vae_model, temporal=temporal_vae), text_encoder=text,
                      scheduler_config=default_scheduler_config())


def _randomize_zero_layers(module: torch.nn.Module, seed: int) -> None:
    """PyTorch initialises nothing to zero, but make that explicit: every layer must matter in tests."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.abs().sum() == 0 and p.dim() >= 1 and not name.endswith("norm.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def make_tiny_checkpoint(folder: str | os.PathLike, seed: int = 0, temporal_vae: bool = True,
                         unet_config: UNetConfig | None = None) -> Path:
    """Write a complete tiny checkpoint folder (tiny UNet, tiny VAE, tiny CLIP and tokenizer)."""
    checkpoint = make_tiny_components(seed=seed, unet_config=unet_config, temporal_vae=temporal_vae)
    return save_checkpoint(folder, checkpoint)
