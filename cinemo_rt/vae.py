"""The two VAEs of the released layout as plain PyTorch: the SD `AutoencoderKL` (`vae/`) and the SVD
`AutoencoderKLTemporalDecoder` (`vae_temporal_decoder/`).

Module and parameter names are diffusers', so their state dicts load key for key, and so is every operation's
order, so their outputs are bit-equal to diffusers' (tests/test_own_components.py). They live here because
importing diffusers pulls in torch._dynamo, sympy and scipy: seconds on a CPU, more than the demo's
denoising. Only inference and what the pipeline calls are kept: `encode(x).latent_dist.mean/.std`,
`decode(z[, num_frames]).sample`, `config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .component_config import ComponentConfig, choice, sizes, whole

# diffusers' defaults for the keys a config.json may leave out.
SD_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
TEMPORAL_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"], "block_out_channels": [64],
    "layers_per_block": 1, "latent_channels": 4, "sample_size": 32, "scaling_factor": 0.18215,
    "force_upcast": True,
}
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}
TEMPORAL_GROUPS = 32  # the SVD VAE's norms, fixed in diffusers whatever the config


@dataclass
class Posterior:
    """The diagonal Gaussian the encoder predicts; only what the pipeline reads."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "Posterior":
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, torch.clamp(logvar, -30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)


@dataclass
class EncoderOutput:
    latent_dist: Posterior


@dataclass
class DecoderOutput:
    sample: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------
class ResnetBlock2D(nn.Module):
    """norm, act, conv, norm, act, conv, plus a 1x1 shortcut when the width changes (no time embedding)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act: str = "silu", eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.nonlinearity = ACTIVATIONS[act]()
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)
                              if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, group-normed, with a residual: diffusers'
    `Attention` under `AttnProcessor2_0`, the same views and transposes so that every matmul sees the same
    strides."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.view(b, c, h * w).transpose(1, 2)
        tokens = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        q = self.to_q(tokens).view(b, -1, 1, c).transpose(1, 2)
        k = self.to_k(tokens).view(b, -1, 1, c).transpose(1, 2)
        v = self.to_v(tokens).view(b, -1, 1, c).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, c).to(q.dtype)
        out = self.to_out[0](out)
        return out.transpose(-1, -2).reshape(b, c, h, w) + x


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))  # asymmetric, as SD's encoder


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act: str, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act)
                                     for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act: str, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act)
                                     for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet, attention, resnet (the attention optional)."""

    def __init__(self, channels: int, groups: int, act: str, attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, act),
                                      ResnetBlock2D(channels, channels, groups, act)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """image (B, in, H, W) -> moments (B, 2 * latent, H / 2^(levels-1), ...), before `quant_conv`."""

    def __init__(self, in_channels: int, latent_channels: int, widths: tuple[int, ...], layers: int, groups: int,
                 act: str, attention: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(widths[max(i - 1, 0)], widths[i], layers, groups, act, downsample=i < len(widths) - 1)
            for i in range(len(widths)))
        self.mid_block = UNetMidBlock2D(widths[-1], groups, act, attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """SD's decoder: latents -> image, each level with one resnet more than the encoder's."""

    def __init__(self, latent_channels: int, out_channels: int, widths: tuple[int, ...], layers: int, groups: int,
                 act: str, attention: bool):
        super().__init__()
        reversed_widths = list(reversed(widths))
        self.conv_in = nn.Conv2d(latent_channels, widths[-1], 3, stride=1, padding=1)
        # Registered before the mid block, as diffusers does: the same state-dict order, the same weight digest
        # for the engines build's cache.
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(reversed_widths[max(i - 1, 0)], reversed_widths[i], layers + 1, groups, act,
                             upsample=i < len(widths) - 1)
            for i in range(len(widths)))
        self.mid_block = UNetMidBlock2D(widths[-1], groups, act, attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


def _check_block_types(config: Mapping, key: str, kind: str, levels: int) -> None:
    types = config[key]
    if not isinstance(types, (list, tuple)) or len(types) != levels or any(t != kind for t in types):
        raise ValueError(f"{key} must list {kind!r} once per entry of block_out_channels ({levels}); got {types!r}")


# ---------------------------------------------------------------------------------------------
# The SD VAE
# ---------------------------------------------------------------------------------------------
class AutoencoderKL(nn.Module):
    """The SD VAE (`vae/`): encoder + `quant_conv`, `post_quant_conv` + decoder."""

    def __init__(self, config: Mapping):
        super().__init__()
        self.config = c = ComponentConfig.with_defaults(config, SD_DEFAULTS)
        widths, layers, groups = sizes(c, "block_out_channels"), whole(c, "layers_per_block"), whole(c, "norm_num_groups")
        latent, act = whole(c, "latent_channels"), choice(c, "act_fn", ACTIVATIONS)
        _check_block_types(c, "down_block_types", "DownEncoderBlock2D", len(widths))
        _check_block_types(c, "up_block_types", "UpDecoderBlock2D", len(widths))
        attention = bool(c["mid_block_add_attention"])
        self.encoder = Encoder(whole(c, "in_channels"), latent, widths, layers, groups, act, attention)
        self.decoder = Decoder(latent, whole(c, "out_channels"), widths, layers, groups, act, attention)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if c["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if c["use_post_quant_conv"] else None

    @classmethod
    def from_config(cls, config: Mapping) -> "AutoencoderKL":
        return cls(config)

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return EncoderOutput(Posterior.from_moments(moments))

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return DecoderOutput(self.decoder(z))


# ---------------------------------------------------------------------------------------------
# The SVD VAE: SD's encoder, a decoder whose blocks also mix along the frames
# ---------------------------------------------------------------------------------------------
class TemporalResnetBlock(nn.Module):
    """A resnet block of (3, 1, 1) convolutions: along the frames only."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(TEMPORAL_GROUPS, channels, eps=eps, affine=True)
        self.conv1 = nn.Conv3d(channels, channels, (3, 1, 1), stride=1, padding=(1, 0, 0))
        self.norm2 = nn.GroupNorm(TEMPORAL_GROUPS, channels, eps=eps, affine=True)
        self.conv2 = nn.Conv3d(channels, channels, (3, 1, 1), stride=1, padding=(1, 0, 0))
        self.nonlinearity = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        return x + h


class AlphaBlender(nn.Module):
    """The learnt mix of the spatial and temporal paths: sigmoid(mix_factor) weighs the spatial one (diffusers'
    "learned" strategy with `switch_spatial_to_temporal_mix`)."""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def forward(self, spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
        alpha = 1.0 - torch.sigmoid(self.mix_factor).to(spatial.dtype)
        return alpha * spatial + (1.0 - alpha) * temporal


class SpatioTemporalResBlock(nn.Module):
    """A 2D resnet block per frame, then a temporal one over the frames of each video, blended."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, TEMPORAL_GROUPS)
        self.temporal_res_block = TemporalResnetBlock(out_channels)
        self.time_mixer = AlphaBlender()

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.spatial_res_block(x)
        batch_frames, channels, height, width = x.shape
        videos = x[None, :].reshape(batch_frames // num_frames, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
        mixed = self.time_mixer(videos, self.temporal_res_block(videos))
        return mixed.permute(0, 2, 1, 3, 4).reshape(batch_frames, channels, height, width)


class MidBlockTemporalDecoder(nn.Module):
    """`layers` spatio-temporal resnets with the attention between the first two; with one layer the attention
    holds weights but is never run, as in diffusers."""

    def __init__(self, channels: int, layers: int):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, TEMPORAL_GROUPS)])
        self.resnets = nn.ModuleList(SpatioTemporalResBlock(channels, channels) for _ in range(layers))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.resnets[0](x, num_frames)
        for resnet, attention in zip(self.resnets[1:], self.attentions):
            x = resnet(attention(x), num_frames)
        return x


class UpBlockTemporalDecoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(SpatioTemporalResBlock(in_channels if i == 0 else out_channels, out_channels)
                                     for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class TemporalDecoder(nn.Module):
    """latents of consecutive frames (B * num_frames, 4, h, w) -> images; a last (3, 1, 1) convolution over
    each video's frames."""

    def __init__(self, latent_channels: int, out_channels: int, widths: tuple[int, ...], layers: int):
        super().__init__()
        reversed_widths = list(reversed(widths))
        self.conv_in = nn.Conv2d(latent_channels, widths[-1], 3, stride=1, padding=1)
        self.mid_block = MidBlockTemporalDecoder(widths[-1], layers)
        self.up_blocks = nn.ModuleList(
            UpBlockTemporalDecoder(reversed_widths[max(i - 1, 0)], reversed_widths[i], layers + 1,
                                   upsample=i < len(widths) - 1)
            for i in range(len(widths)))
        self.conv_norm_out = nn.GroupNorm(TEMPORAL_GROUPS, widths[0], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        self.time_conv_out = nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z), num_frames)
        x = x.to(next(self.up_blocks.parameters()).dtype)
        for block in self.up_blocks:
            x = block(x, num_frames)
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        batch_frames, channels, height, width = x.shape
        videos = x[None, :].reshape(batch_frames // num_frames, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
        return self.time_conv_out(videos).permute(0, 2, 1, 3, 4).reshape(batch_frames, channels, height, width)


class AutoencoderKLTemporalDecoder(nn.Module):
    """The SVD VAE (`vae_temporal_decoder/`, the release's default): SD's encoder + `quant_conv`, the temporal
    decoder (no `post_quant_conv`)."""

    def __init__(self, config: Mapping):
        super().__init__()
        self.config = c = ComponentConfig.with_defaults(config, TEMPORAL_DEFAULTS)
        widths, layers, latent = sizes(c, "block_out_channels"), whole(c, "layers_per_block"), whole(c, "latent_channels")
        _check_block_types(c, "down_block_types", "DownEncoderBlock2D", len(widths))
        self.encoder = Encoder(whole(c, "in_channels"), latent, widths, layers, TEMPORAL_GROUPS, "silu", attention=True)
        self.decoder = TemporalDecoder(latent, whole(c, "out_channels"), widths, layers)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)

    @classmethod
    def from_config(cls, config: Mapping) -> "AutoencoderKLTemporalDecoder":
        return cls(config)

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(Posterior.from_moments(self.quant_conv(self.encoder(x))))

    def decode(self, z: torch.Tensor, num_frames: int = 1) -> DecoderOutput:
        """z: (B * num_frames, 4, h, w), the frames of each video consecutive."""
        return DecoderOutput(self.decoder(z, num_frames))
