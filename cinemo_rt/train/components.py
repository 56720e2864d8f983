"""Building the frozen parts for training from scratch: a small VAE pre-trained as a plain autoencoder on the
dataset frames, and a fixed random CLIP text encoder with a tokenizer for the caption vocabulary.

The text encoder stays random and frozen: distinct prompts still get distinct, fixed embeddings, which is
all the UNet needs to learn which words mean which motion (the real Cinemo freezes its CLIP too).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F

from ..components import TextEncoder
from ..small_clip import tiny_text_encoder, write_tokenizer
from .data import to_model_pixels

log = logging.getLogger(__name__)


TRAINING_COPIES = 4  # weights, gradients and AdamW's two moments, each the size of the parameters


def build_within_memory(make, what: str):
    """`make()` a model from a training config's values, first on the meta device (no memory): a config
    whose training would not fit in the memory available is refused with its size, before it is allocated."""
    from ..limits import available_memory, gib

    try:
        with torch.device("meta"):
            model = make()
            parameters = sum(p.numel() for p in getattr(model, "model", model).parameters())  # TextEncoder wraps
    except Exception as err:  # noqa: BLE001 - any failure to build from the user's values is theirs to fix
        raise ValueError(f"training config {what} cannot build the model ({type(err).__name__}: {err})") from None
    need, memory = parameters * 4 * TRAINING_COPIES, available_memory()
    if memory is not None and need > memory:
        raise ValueError(f"training config {what} asks for {parameters:,} parameters: about {gib(need)} to train, "
                         f"{gib(memory)} is available; make it smaller")
    return make()


def build_text_encoder(folder: Path, words: Iterable[str], seed: int, options: Mapping[str, Any]) -> TextEncoder:
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder, words)
    text = build_within_memory(lambda: tiny_text_encoder(tokenizer, hidden=int(options.get("hidden", 64)),
                                                         layers=int(options.get("layers", 2)),
                                                         heads=int(options.get("heads", 2))), "text_encoder")
    text.model.requires_grad_(False).eval()
    return text


def build_vae(options: Mapping[str, Any], seed: int):
    """A diffusers `AutoencoderKL` from config kwargs (len(block_out_channels) - 1 halvings)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    levels = len(options.get("block_out_channels", (64,)))
    kwargs = {"down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
              "latent_channels": 4, **options}
    return build_within_memory(lambda: AutoencoderKL(**kwargs), "vae")


def with_scaling_factor(vae, scaling_factor: float):
    """A copy of `vae` built with `scaling_factor` in its config. `register_to_config` is not enough: the
    key stays listed in `_use_default_values`, and diffusers' `from_config` then drops the saved value."""
    values = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    fresh = type(vae).from_config({**values, "scaling_factor": float(scaling_factor)})
    fresh.load_state_dict(vae.state_dict())
    return fresh.eval().requires_grad_(False)


def pretrain_vae(vae, frames: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float,
                 generator: torch.Generator, log_every: int = 50, latent_std: float = 1.0):
    """Train `vae` as an autoencoder on uint8 frames (N, H, W, 3): L1 + MSE reconstruction of a posterior
    sample, plus a small KL term that keeps the latents near unit scale. Sets `scaling_factor` to
    latent_std / std of the latent means (SD's 0.18215 is the latent_std = 1 choice). Returns (trained VAE,
    loss per step)."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(frames), (batch,), generator=generator)
        x = to_model_pixels(frames[idx])  # (B, 3, H, W)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.info("vae step %d/%d loss %.4f (%.2f s/step)", step + 1, steps, sum(losses[-log_every:]) /
                     len(losses[-log_every:]), (time.perf_counter() - start) / (step + 1))
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        idx = torch.randint(len(frames), (min(256, len(frames)),), generator=generator)
        means = torch.cat([vae.encode(to_model_pixels(frames[chunk])).latent_dist.mean for chunk in idx.split(64)])
    vae = with_scaling_factor(vae, float(latent_std / means.std()))
    log.info("vae scaling factor %.4f", vae.config.scaling_factor)
    return vae, losses
