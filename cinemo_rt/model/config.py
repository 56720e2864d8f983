"""UNet3D configuration: a frozen dataclass that reads the released `unet/config.json` as is.

Every key of the released config is a field (docs/METHOD.md, choices: "the config accepts every field"), so a
config can be round-tripped; fields the architecture does not support fail loudly instead of being
silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

# Values the released checkpoint uses for options we do not implement. A config that asks for anything
# else is not Cinemo's architecture and is refused with a message naming the field.
_FIXED = {
    "act_fn": "silu",
    "only_cross_attention": False,
    "use_linear_projection": False,
    "upcast_attention": False,
    "transformer_layers_per_block": 1,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "time_embedding_act_fn": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "center_input_sample": False,
    "addition_embed_type": "motion_ids",
    "mid_block_type": "UNetMidBlock3DCrossAttn",
    "mid_block_scale_factor": 1,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}

_DOWN_TYPES = ("CrossAttnDownBlock3D", "DownBlock3D")
_UP_TYPES = ("CrossAttnUpBlock3D", "UpBlock3D")

# Head size of the rotary part of temporal attention: always the first 32 channels of a head (docs/METHOD.md, the UNet).
ROTARY_DIM = 32


@dataclass(frozen=True)
class UNetConfig:
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    mid_block_type: str = "UNetMidBlock3DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    only_cross_attention: bool = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int = 1
    encoder_hid_dim: Any = None
    encoder_hid_dim_type: Any = None
    # diffusers naming quirk: for SD-1.x this is the number of heads, not the head size (docs/METHOD.md: the UNet, choices).
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: Any = None
    addition_embed_type: str = "motion_ids"
    addition_time_embed_dim: int = 256
    num_class_embeds: Any = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: Any = None
    timestep_post_act: Any = None
    time_cond_proj_dim: Any = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: Any = None
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: Any = None
    cross_attention_norm: Any = None
    addition_embed_type_num_heads: int = 64
    # Config-file metadata (`_class_name`, `_diffusers_version`) kept for round trips, never used.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("attention_head_dim", "num_attention_heads"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    # -- derived values -------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads per level, down order. `num_attention_heads` wins when given (diffusers)."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        if isinstance(heads, int):
            return (heads,) * self.num_levels
        return tuple(heads)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    def _validate(self) -> None:
        for key, expected in _FIXED.items():
            if getattr(self, key) != expected:
                raise ValueError(
                    f"UNet config field {key}={getattr(self, key)!r} is not supported by cinemo-rt "
                    f"(Cinemo's architecture uses {expected!r}); fix the config.json or use a Cinemo checkpoint."
                )
        self._validate_sizes()
        n = self.num_levels
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"UNet config: {len(self.down_block_types)} down and {len(self.up_block_types)} up block types "
                f"for {n} levels in block_out_channels; they must all have the same length."
            )
        bad = [t for t in self.down_block_types if t not in _DOWN_TYPES]
        bad += [t for t in self.up_block_types if t not in _UP_TYPES]
        if bad:
            raise ValueError(f"UNet config: unknown block types {bad}; expected {_DOWN_TYPES} / {_UP_TYPES}.")
        heads = self.heads_per_level
        if len(heads) != n:
            raise ValueError(f"UNet config: attention_head_dim has {len(heads)} entries for {n} levels.")
        for channels, h in zip(self.block_out_channels, heads):
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"UNet config: block_out_channels entry {channels} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}."
                )
            if channels % h or channels // h < ROTARY_DIM:
                raise ValueError(
                    f"UNet config: {channels} channels with {h} heads gives head size {channels / h:g}; "
                    f"it must be a whole number >= {ROTARY_DIM} (temporal rotary embedding size)."
                )

    def _validate_sizes(self) -> None:
        """Sizes are whole numbers >= 1 (0 or negative values fail deep inside torch otherwise)."""
        sizes = {name: getattr(self, name) for name in (
            "sample_size", "in_channels", "out_channels", "layers_per_block", "norm_num_groups",
            "cross_attention_dim", "addition_time_embed_dim", "transformer_layers_per_block")}
        sizes["block_out_channels"] = self.block_out_channels
        sizes["attention heads"] = self.heads_per_level if self.block_out_channels else (1,)
        for name, value in sizes.items():
            values = value if isinstance(value, tuple) else (value,)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"UNet config: {name} must be whole numbers >= 1; got {value!r}")

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "UNetConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        meta = {k: v for k, v in values.items() if k.startswith("_")}
        unknown = sorted(k for k in values if k not in names and not k.startswith("_") and k != "extra")
        if unknown:
            raise ValueError(f"UNet config has fields cinemo-rt does not know: {unknown}.")
        return cls(**known, extra=meta)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "UNetConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        out = {"_class_name": "UNet3DConditionModel", **dict(self.extra)}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def full_config() -> UNetConfig:
    """The released Cinemo UNet (911,092,740 parameters)."""
    return UNetConfig()


def tiny_config(cross_attention_dim: int = 32) -> UNetConfig:
    """A two-level miniature for tests: every block type, head size 32 (the rotary minimum)."""
    return UNetConfig(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block=1,
        attention_head_dim=(1, 2),
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        addition_time_embed_dim=32,
        sample_size=8,
    )


def as_config(config: "UNetConfig | Mapping[str, Any] | str | os.PathLike") -> UNetConfig:
    if isinstance(config, UNetConfig):
        return config
    if isinstance(config, Mapping):
        return UNetConfig.from_dict(config)
    return UNetConfig.from_file(config)

