"""Transformer parts of Cinemo's UNet3D: spatial, cross and temporal attention (docs/METHOD.md, the UNet).

Module and parameter names follow the released state dict (diffusers `Attention` names plus LaVie's
`attn_temp`, `norm_temp`, `time_rel_pos_bias`, `rotary_emb`). Everything is written with static
reshapes and plain matmuls so that it traces to a clean ONNX graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ROTARY_DIM
from .layout import fold_frames, unfold_frames


# ---------------------------------------------------------------------------------------------
# Per-call tables shared by every temporal attention block
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TemporalTables:
    """Rotary cos/sin tables (F, 32) and the relative-position bucket table (F, F) for one frame count.

    Built once per UNet call (not cached across calls, so tracing bakes them per export shape)."""

    cos: torch.Tensor
    sin: torch.Tensor
    buckets: torch.Tensor


class RotaryEmbedding(nn.Module):
    """LaVie's `RotaryEmbedding(dim=32)` (rotary_embedding_torch): interleaved-pair rotation, theta 1e4.

    One instance is shared by all temporal attention blocks; the released state dict still lists its
    `freqs` under every block, which sharing the module reproduces."""

    def __init__(self, dim: int = ROTARY_DIM, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.register_buffer("freqs", freqs, persistent=True)

    def tables(self, num_frames: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(num_frames, device=self.freqs.device).to(self.freqs.dtype)
        angles = positions[:, None] * self.freqs[None, :]  # (F, 16)
        angles = angles.repeat_interleave(2, dim=-1)  # (F, 32): pairs (n r), r=2
        # The original casts angles to the compute dtype *before* cos/sin (`freqs.to(t)`, docs/METHOD.md, the UNet).
        angles = angles.to(dtype)
        return angles.cos(), angles.sin()


def relative_position_buckets(num_frames: int, device: torch.device | None = None,
                              num_buckets: int = 32, max_distance: int = 32) -> torch.Tensor:
    """T5 bidirectional buckets of n = i - j (query i, key j), as LaVie's RelativePositionBias."""
    pos = torch.arange(num_frames, device=device)
    n = pos[:, None] - pos[None, :]  # (F, F): i - j
    half = num_buckets // 2
    ret = (n < 0).long() * half
    n = n.abs()
    max_exact = half // 2
    n_safe = n.clamp(min=1).float()  # log(0) is masked out by `is_small` below
    large = max_exact + (torch.log(n_safe / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return ret + torch.where(n < max_exact, n, large)


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on the first 32 channels of each head: pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    rot, rest = x[..., :ROTARY_DIM], x[..., ROTARY_DIM:]
    pairs = rot.unflatten(-1, (ROTARY_DIM // 2, 2))  # (..., 16, 2)
    rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (..., 32)
    rot = rot * cos + rotated_half * sin
    return torch.cat((rot, rest), dim=-1)


# ---------------------------------------------------------------------------------------------
# Attention layers
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """diffusers `Attention` with AttnProcessor2_0: q/k/v without bias, `to_out.0` with bias."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.view(n, length, self.heads, -1).transpose(1, 2)  # (N, heads, L, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d), no mask
        n, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(n, length, -1)
        return self.to_out[1](self.to_out[0](out))


class RelativePositionBias(nn.Module):
    def __init__(self, heads: int, num_buckets: int = 32):
        super().__init__()
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.relative_attention_bias(buckets).permute(2, 0, 1)  # (heads, F, F)


class TemporalAttention(nn.Module):
    """Attention across frames at each spatial position, with rotary and T5 relative-position bias."""

    def __init__(self, dim: int, heads: int, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.time_rel_pos_bias = RelativePositionBias(heads)
        self.rotary_emb = rotary_emb  # shared instance

    def forward(self, x: torch.Tensor, tables: TemporalTables) -> torch.Tensor:
        n, frames, dim = x.shape  # (B*H*W, F, C)
        head_dim = dim // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, frames, self.heads, head_dim).transpose(1, 2)  # (N, heads, F, d)

        q = split(self.to_q(x)) * head_dim ** -0.5  # pre-scaled before rotary, as the original
        k = split(self.to_k(x))
        v = split(self.to_v(x))
        q = rotate_interleaved(q, tables.cos, tables.sin)
        k = rotate_interleaved(k, tables.cos, tables.sin)
        scores = q @ k.transpose(-1, -2) + self.time_rel_pos_bias(tables.buckets)  # (N, heads, F, F)
        out = scores.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(n, frames, dim)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)  # exact erf GELU


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """self-attn -> cross-attn -> temporal attn -> GEGLU, each pre-LayerNorm with a residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, rotary_emb: RotaryEmbedding):
        super().__init__()
        head_dim = dim // heads
        # Registration order matters: it is the released state dict's key order.
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.attn_temp = TemporalAttention(dim, heads, rotary_emb)
        self.norm_temp = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, tables: TemporalTables,
                batch: int, frames: int) -> torch.Tensor:
        bf, tokens, dim = x.shape  # (B*F, H*W, C)
        x = self.attn1(self.norm1(x)) + x
        # Cross-attention is independent per query, so all frames of a video attend to their one text
        # in a single sequence: K/V are computed once per video instead of once per frame.
        per_video = self.norm2(x).reshape(batch, frames * tokens, dim)
        x = self.attn2(per_video, context).reshape(bf, tokens, dim) + x
        # Temporal: (B F) D C -> (B D) F C
        xt = x.view(batch, frames, tokens, dim).transpose(1, 2).reshape(batch * tokens, frames, dim)
        xt = self.attn_temp(self.norm_temp(xt), tables) + xt
        x = xt.view(batch, tokens, frames, dim).transpose(1, 2).reshape(bf, tokens, dim)
        return self.ff(self.norm3(x)) + x


class Transformer3DModel(nn.Module):
    """Per-frame GroupNorm (eps 1e-6) -> 1x1 proj_in -> one BasicTransformerBlock -> 1x1 proj_out -> residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, norm_groups: int,
                 rotary_emb: RotaryEmbedding):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim, rotary_emb)])
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, tables: TemporalTables) -> torch.Tensor:
        b, c, f, h, w = x.shape
        frames = fold_frames(x)  # (B*F, C, H, W)
        hidden = self.proj_in(self.norm(frames))
        hidden = hidden.flatten(2).transpose(1, 2)  # (B*F, H*W, C)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, tables, b, f)
        # Contiguous NCHW, not the channels_last view a reshape of the transpose gives: that view would flow
        # through the residual into every later convolution (cinemo_rt/model/layout.py says why it is slow).
        hidden = hidden.transpose(1, 2).contiguous().view(b * f, c, h, w)
        out = self.proj_out(hidden) + frames
        return unfold_frames(out, b)  # (B, C, F, H, W)
