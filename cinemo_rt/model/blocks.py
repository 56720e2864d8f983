"""Convolutional parts of Cinemo's UNet3D: ResNet blocks, resampling and the down/mid/up stages.

Activations are 5D (B, C, F, H, W). Convolutions are 2D per frame ("inflated"); GroupNorms of the ResNet
blocks see the whole 5D tensor, so their statistics are pooled over all frames (docs/METHOD.md, the UNet).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import RotaryEmbedding, TemporalTables, Transformer3DModel
from .conv import Conv2d
from .layout import fold_frames, unfold_frames


def per_frame(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D layer to every frame: (B, C, F, H, W) -> (B*F, C, H, W) -> layer -> back."""
    return unfold_frames(conv(fold_frames(x)), x.shape[0])


class ResnetBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = per_frame(self.conv1, F.silu(self.norm1(x)))  # 5D GroupNorm: stats over all frames
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        h = per_frame(self.conv2, F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else per_frame(self.conv_shortcut, x)
        return shortcut + h  # output_scale_factor 1.0


class Downsample3D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame(self.conv, x)


class Upsample3D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        frames = fold_frames(x)
        if size is None:
            # Nearest 2x over H and W only; frames are never resampled.
            frames = F.interpolate(frames, scale_factor=2.0, mode="nearest")
        else:
            # Latent sizes not divisible by 2**levels: match the skip connection's size (docs/METHOD.md, the UNet).
            frames = F.interpolate(frames, size=size, mode="nearest")
        return unfold_frames(self.conv(frames), x.shape[0])


class DownBlock3D(nn.Module):
    """`DownBlock3D` or, with `heads`, `CrossAttnDownBlock3D`."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int,
                 groups: int, eps: float, add_downsample: bool, padding: int,
                 heads: int | None = None, context_dim: int = 0, rotary_emb: RotaryEmbedding | None = None):
        super().__init__()
        if heads is not None:  # attentions before resnets: the released key order
            self.attentions = nn.ModuleList(
                [Transformer3DModel(out_channels, heads, context_dim, groups, rotary_emb) for _ in range(num_layers)]
            )
        else:
            self.attentions = None
        self.resnets = nn.ModuleList(
            [ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
             for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample3D(out_channels, padding)]) if add_downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                tables: TemporalTables) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, tables)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock3D(nn.Module):
    """`UpBlock3D` or, with `heads`, `CrossAttnUpBlock3D`; each resnet eats one skip connection."""

    def __init__(self, in_channels: int, prev_channels: int, out_channels: int, temb_channels: int,
                 num_layers: int, groups: int, eps: float, add_upsample: bool,
                 heads: int | None = None, context_dim: int = 0, rotary_emb: RotaryEmbedding | None = None):
        super().__init__()
        if heads is not None:
            self.attentions = nn.ModuleList(
                [Transformer3DModel(out_channels, heads, context_dim, groups, rotary_emb) for _ in range(num_layers)]
            )
        else:
            self.attentions = None
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_channels if i == 0 else out_channels
            resnets.append(ResnetBlock3D(resnet_in + skip_channels, out_channels, temb_channels, groups, eps))
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                tables: TemporalTables, upsample_size: tuple[int, int] | None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, tables)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock3DCrossAttn(nn.Module):
    def __init__(self, channels: int, temb_channels: int, groups: int, eps: float, heads: int,
                 context_dim: int, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.attentions = nn.ModuleList([Transformer3DModel(channels, heads, context_dim, groups, rotary_emb)])
        self.resnets = nn.ModuleList([ResnetBlock3D(channels, channels, temb_channels, groups, eps) for _ in range(2)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                tables: TemporalTables) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, tables)
        return self.resnets[1](x, temb)
