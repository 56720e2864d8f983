"""The four graphs every backend runs, as the export writes them and the runtime feeds them:
their input and output names, dtypes and ranks, and the PyTorch modules that compute them.

    text_encoder  ids (B, 77) int64                                  -> text (B, 77, D)
    vae_encoder   image (B, 3, H, W) in [-1, 1]                      -> mean, std (B, 4, H/8, W/8), unscaled
    unet          x_t (B, 4, F, h, w), t (B,) int64, text (B, 77, D),
                  z1 (B, 4, 1, h, w), motion_id (B,) float32         -> eps (B, 4, F, h, w) (or v)
    vae_decoder   latents (N, 4, h, w) of one chunk, unscaled        -> images (N, 3, H, W)

"float" inputs are in the graph's precision. Everything around these calls (posterior sampling, scaling,
chunking, broadcasting, uint8) is pipeline policy and lives once, in `cinemo_rt.stages`.
`export/specs.py` adds shapes, dynamic axes and profiles to these contracts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GraphIO:
    name: str
    inputs: tuple[str, ...]
    input_dtypes: tuple[str, ...]  # "float" (the graph's precision), "float32" or "int64"
    input_ranks: tuple[int, ...]
    outputs: tuple[str, ...]


TEXT_ENCODER = GraphIO("text_encoder", ("ids",), ("int64",), (2,), ("text",))
VAE_ENCODER = GraphIO("vae_encoder", ("image",), ("float",), (4,), ("mean", "std"))
UNET = GraphIO("unet", ("x_t", "t", "text", "z1", "motion_id"), ("float", "int64", "float", "float", "float32"),
               (5, 1, 3, 5, 1), ("eps",))
VAE_DECODER = GraphIO("vae_decoder", ("latents",), ("float",), (4,), ("images",))
GRAPHS: dict[str, GraphIO] = {g.name: g for g in (TEXT_ENCODER, VAE_ENCODER, UNET, VAE_DECODER)}
FIXED_DTYPES = {"float32": torch.float32, "int64": torch.int64}


# ---------------------------------------------------------------------------------------------
# Wrappers: the exact calls, as modules with positional tensor I/O (exported as they are)
# ---------------------------------------------------------------------------------------------
class TextEncoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)[0]  # last hidden state (B, 77, D), no attention mask (docs/METHOD.md, pipeline)


class VAEEncoderGraph(nn.Module):
    """image (B, 3, H, W) -> posterior mean, std (B, 4, h, w), unscaled. The random sample is taken on the
    host with an explicit noise tensor, so the graph is deterministic."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(image).latent_dist
        return dist.mean, dist.std


class VAEDecoderGraph(nn.Module):
    """unscaled latents (N, 4, h, w) of one chunk -> images (N, 3, H, W); the temporal decoder gets
    num_frames = N, so its temporal layers never look across a chunk boundary (as the reference)."""

    def __init__(self, vae: nn.Module, temporal: bool):
        super().__init__()
        self.vae = vae
        self.temporal = temporal

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.temporal:
            return self.vae.decode(latents, num_frames=latents.shape[0]).sample
        return self.vae.decode(latents).sample


def graph_modules(checkpoint) -> dict[str, nn.Module]:
    """The four graphs of a loaded `Checkpoint` as modules (the VAE encoder at its encoding precision)."""
    vae = checkpoint.vae
    return {"text_encoder": TextEncoderGraph(checkpoint.text_encoder.model),
            "vae_encoder": VAEEncoderGraph(vae.encoder_model or vae.model),
            "unet": checkpoint.unet,
            "vae_decoder": VAEDecoderGraph(vae.model, vae.temporal)}
