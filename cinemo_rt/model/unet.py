"""Cinemo's UNet3D (LaVie's video UNet plus motion embedding and residual input; docs/METHOD.md:
motion intensity, the UNet)."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .attention import RotaryEmbedding, TemporalTables, relative_position_buckets
from .blocks import DownBlock3D, UNetMidBlock3DCrossAttn, UpBlock3D, per_frame
from .config import UNetConfig, as_config
from .conv import Conv2d
from ..residuals import frames_from_residuals


def sinusoidal_embedding(values: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                         freq_shift: float = 0.0) -> torch.Tensor:
    """diffusers `Timesteps`: [cos(v w_k), sin(v w_k)], w_k = exp(-ln(1e4) k / (dim/2 - shift)). fp32."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=values.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = values.float()[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class UNet3D(nn.Module):
    """`unet(x_t, t, text, z1, motion_id) -> eps` for the residual frames.

    x_t:       (B, 4, F, h, w)  noisy motion residuals z_i - z_1, F frames to generate (15 released)
    t:         ()  or (B,)      integer timestep
    text:      (B, 77, D)       CLIP last hidden state
    z1:        (B, 4, 1, h, w)  clean latent of the input image
    motion_id: (B,)             float motion id (99 - bucket for the released weights)
    returns    (B, 4, F, h, w)  epsilon for the residual frames
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        channels = c.block_out_channels
        heads = c.heads_per_level
        temb = c.time_embed_dim
        groups, eps = c.norm_num_groups, c.norm_eps
        rotary = RotaryEmbedding()  # one instance, registered inside every temporal attention
        self._shared_rotary = (rotary,)  # a tuple: reachable here without a duplicate state-dict entry

        self.conv_in = Conv2d(c.in_channels, channels[0], c.conv_in_kernel, padding=(c.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        self.add_embedding = TimestepEmbedding(c.addition_time_embed_dim, temb)

        self.down_blocks = nn.ModuleList()
        out_ch = channels[0]
        for i, block_type in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            cross = block_type == "CrossAttnDownBlock3D"
            self.down_blocks.append(DownBlock3D(
                in_ch, out_ch, temb, c.layers_per_block, groups, eps,
                add_downsample=i < len(channels) - 1, padding=c.downsample_padding,
                heads=heads[i] if cross else None, context_dim=c.cross_attention_dim, rotary_emb=rotary))

        rev_channels = list(reversed(channels))
        rev_heads = list(reversed(heads))
        self.up_blocks = nn.ModuleList()
        out_ch = rev_channels[0]
        for i, block_type in enumerate(c.up_block_types):
            prev_ch, out_ch = out_ch, rev_channels[i]
            in_ch = rev_channels[min(i + 1, len(channels) - 1)]
            cross = block_type == "CrossAttnUpBlock3D"
            self.up_blocks.append(UpBlock3D(
                in_ch, prev_ch, out_ch, temb, c.layers_per_block + 1, groups, eps,
                add_upsample=i < len(channels) - 1,
                heads=rev_heads[i] if cross else None, context_dim=c.cross_attention_dim, rotary_emb=rotary))

        # Registered after the up blocks, as in the original (its state dict lists mid_block last).
        self.mid_block = UNetMidBlock3DCrossAttn(channels[-1], temb, groups, eps, heads[-1],
                                                 c.cross_attention_dim, rotary)
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = Conv2d(channels[0], c.out_channels, c.conv_out_kernel,
                                  padding=(c.conv_out_kernel - 1) // 2)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: UNetConfig | Mapping[str, Any] | str | os.PathLike) -> "UNet3D":
        """From a `UNetConfig`, a dict, a `config.json` path, or a checkpoint's `unet/` folder."""
        if isinstance(config, (str, os.PathLike)) and os.path.isdir(config):
            config = os.path.join(config, "config.json")
        return cls(as_config(config))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def temporal_tables(self, num_frames: int, dtype: torch.dtype) -> TemporalTables:
        cos, sin = self._shared_rotary[0].tables(num_frames, dtype)
        return TemporalTables(cos, sin, relative_position_buckets(num_frames, cos.device))

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, z1: torch.Tensor,
                motion_id: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(batch)
        motion_id = torch.as_tensor(motion_id, device=x_t.device)
        if motion_id.dim() == 0:
            motion_id = motion_id.expand(batch)

        # Time and motion embeddings (docs/METHOD.md, motion intensity): both sinusoids in fp32, cast, MLP, summed.
        c = self.config
        t_emb = sinusoidal_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(dtype)
        m_emb = sinusoidal_embedding(motion_id, c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift).to(dtype)
        emb = self.time_embedding(t_emb) + self.add_embedding(m_emb)

        # Residual formulation: frames [z1, z1 + x_t], the first frame is conditioning only.
        sample = frames_from_residuals(z1.to(dtype), x_t.to(dtype))  # (B, 4, 1+F, h, w)
        text = text.to(dtype)
        tables = self.temporal_tables(sample.shape[2], dtype)

        # Latent sizes not divisible by 2**upsamplers take the explicit upsample-size path.
        factor = 2 ** (len(self.up_blocks) - 1)
        explicit_sizes = any(s % factor for s in sample.shape[-2:])

        h = per_frame(self.conv_in, sample)
        skips: list[torch.Tensor] = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, text, tables)
            skips.extend(block_skips)

        h = self.mid_block(h, emb, text, tables)

        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = None
            if explicit_sizes and block.upsamplers is not None:
                size = tuple(skips[-1].shape[-2:])
            h = block(h, block_skips, emb, text, tables, size)

        h = F.silu(self.conv_norm_out(h))  # 5D GroupNorm over all frames
        eps = per_frame(self.conv_out, h)
        return eps[:, :, 1:]  # drop the z1 frame
