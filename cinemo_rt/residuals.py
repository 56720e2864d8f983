"""Cinemo's residual formulation (docs/METHOD.md, motion residuals), in one place: the UNet denoises the motion residuals
M = z_{2..N} - z_1 of the frame latents, never the frames themselves."""

from __future__ import annotations

import torch


def residuals_from_frames(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame latents (B, C, N, h, w) -> (z1 (B, C, 1, h, w), residuals (B, C, N-1, h, w)), both dense row-major
    whatever the layout of `frames` (z1 is not left a strided view: DCTInit's kernel takes dense tensors)."""
    z1 = frames[:, :, :1].contiguous()
    return z1, (frames[:, :, 1:] - z1).contiguous()


def frames_from_residuals(z1: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """z1 (B, C, 1, h, w) and residuals (B, C, F, h, w) -> frames [z1, z1 + M] (B, C, 1 + F, h, w)."""
    return torch.cat([z1, z1 + residuals], dim=2)
