"""The reference model's one memory layout: frames folded into the batch as contiguous NCHW.

Every 2D layer (convolutions, per-frame GroupNorm) sees a contiguous (B*F, C, H, W) tensor. A strided view
instead (a permute that reshape could not fold, or a channels_last view) makes each convolution copy its
input or, for channels_last, convert its NCHW weight on every call and run the channels_last kernel, which
is slower on the CPU at the small maps of a latent UNet (docs/ARCHITECTURE.md, "Memory layout")."""

from __future__ import annotations

import torch


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> contiguous (B*F, C, H, W): one copy, as a reshape of the permute would make."""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).contiguous().view(b * f, c, h, w)


def unfold_frames(y: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H, W) as a view (no copy; the next fold_frames makes it contiguous)."""
    bf, c, h, w = y.shape
    return y.view(batch, bf // batch, c, h, w).transpose(1, 2)
