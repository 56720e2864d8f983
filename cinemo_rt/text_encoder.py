"""The CLIP text tower (`text_encoder/`) as plain PyTorch: token ids (B, L) -> last hidden state (B, L, D).

Parameter names are transformers' `CLIPTextModel` (a released `text_model.` prefix is dropped by the loader),
and the order of operations is its SDPA path's, so outputs are bit-equal (tests/test_own_components.py). It
lives here because importing transformers costs seconds on a CPU. Only what the pipeline runs is kept: no
pooled output, no attention mask (Cinemo conditions on all 77 positions, padding included).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .component_config import ComponentConfig, choice, whole

# transformers' defaults for the keys a config.json may leave out.
DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "pad_token_id": 1, "bos_token_id": 49406,
    "eos_token_id": 49407,
}
# The key prefix transformers before version 5 wrote, and the released checkpoint has.
STATE_PREFIX = "text_model."


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5  # given to SDPA as transformers does, not left to its own rounding
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        shape = (b, length, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=self.scale,
                                             is_causal=length > 1)
        out = out.transpose(1, 2).contiguous().reshape(b, length, -1).contiguous()
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, hidden, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, layers: int, **sizes):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(**sizes) for _ in range(layers))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, dim: int):
        super().__init__()
        # Left uninitialised (the weights are always loaded): nn.Embedding's random init on the meta device,
        # where the loader first builds a config, would import torch._dynamo (seconds).
        self.token_embedding = nn.Embedding(vocab, dim, _weight=torch.empty(vocab, dim))
        self.position_embedding = nn.Embedding(positions, dim, _weight=torch.empty(positions, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[-1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(f"{length} tokens, more than the {self.position_embedding.num_embeddings} positions")
        return self.token_embedding(ids) + self.position_embedding.weight[:length]


class CLIPTextModel(nn.Module):
    """`model(ids)[0]` is the last hidden state, after the final layer norm (a tuple, as transformers' output
    indexes)."""

    def __init__(self, config: Mapping):
        super().__init__()
        self.config = c = ComponentConfig.with_defaults(config, DEFAULTS)
        dim, heads = whole(c, "hidden_size"), whole(c, "num_attention_heads")
        if dim % heads:
            raise ValueError(f"hidden_size ({dim}) is not a multiple of num_attention_heads ({heads})")
        eps = c["layer_norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"layer_norm_eps must be a small positive number; got {eps!r}")
        self.embeddings = CLIPTextEmbeddings(whole(c, "vocab_size"), whole(c, "max_position_embeddings"), dim)
        self.encoder = CLIPEncoder(whole(c, "num_hidden_layers"), dim=dim, heads=heads,
                                   hidden=whole(c, "intermediate_size"), act=choice(c, "hidden_act", ACTIVATIONS),
                                   eps=eps)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    @classmethod
    def from_config(cls, config: Mapping) -> "CLIPTextModel":
        return cls(config)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor]:
        x = self.embeddings(ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return (self.final_layer_norm(x),)


def without_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in the `text_model.`-prefixed layout of the release (transformers < 5) as this module's."""
    if state and all(k.startswith(STATE_PREFIX) for k in state):
        return {k[len(STATE_PREFIX):]: v for k, v in state.items()}
    return state
