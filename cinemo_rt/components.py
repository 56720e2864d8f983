"""The standard parts around the UNet: the VAE and the CLIP text encoder (docs/METHOD.md, pipeline).

Loaded checkpoints hold this package's own modules (`vae.py`, `text_encoder.py`, `tokenizer.py`), bit-equal to
the diffusers / transformers implementations, which tests and training still build; either kind is wrapped
here with exactly the calls the pipeline needs.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

TEXT_LENGTH = 77  # CLIP's context length; Cinemo pads every prompt to it


@dataclass
class VAE:
    """The VAE and what the pipeline must know of it; its graphs are `cinemo_rt.graphs`' VAE encoder and
    decoder, and the decode policy (scaling, chunks) is `cinemo_rt.stages.decode_latents`.

    `temporal=True` is the SVD `AutoencoderKLTemporalDecoder` (default in the release): chunks of 14 frames,
    each decoded with `num_frames` = chunk length, uint8 by truncation. `temporal=False` is the SD
    `AutoencoderKL`: all frames at once, uint8 with rounding (docs/METHOD.md, pipeline)."""

    model: nn.Module
    temporal: bool
    encoder_model: nn.Module | None = None  # a higher-precision copy for encoding (fp64 in the original)

    @classmethod
    def create(cls, model: nn.Module, temporal: bool, encode_dtype: torch.dtype | None = None) -> "VAE":
        model.eval().requires_grad_(False)
        encoder = None
        if encode_dtype is not None and encode_dtype != next(model.parameters()).dtype:
            encoder = cast_module(copy.deepcopy(model), None, encode_dtype)
            if hasattr(encoder, "decoder"):
                encoder.decoder = None  # the copy only ever encodes
        return cls(model=model, temporal=temporal, encoder_model=encoder)

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def rounding(self) -> bool:
        return not self.temporal

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, 3, H, W) in [-1, 1] -> posterior (mean, std), each (B, 4, H/8, W/8), unscaled."""
        encoder = self.encoder_model or self.model
        dtype = next(encoder.parameters()).dtype
        posterior = encoder.encode(image.to(self.device, dtype)).latent_dist
        return posterior.mean, posterior.std


def images_to_uint8(images: torch.Tensor, rounding: bool = False) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8. The temporal-decoder path truncates, the SD path
    rounds (+0.5), as the two reference code paths do."""
    x = ((images.float() / 2 + 0.5).clamp(0, 1) * 255)
    if rounding:
        x = x + 0.5
    return x.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


@dataclass
class TextEncoder:
    """CLIP tokenizer + text tower: prompts -> last hidden state (B, 77, D), no attention mask (docs/METHOD.md, pipeline)."""

    tokenizer: object
    model: nn.Module

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        return tokenize(self.tokenizer, prompts)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model(ids.to(device))[0]

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids, _ = self.tokenize(list(prompts))
        return self.encode_ids(ids)


def tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
    """Prompts -> CLIP ids (B, 77), padded with the end token and truncated, as the reference; plus, per
    prompt, whether it was truncated (warned about here)."""
    prompts = list(prompts)
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    truncated = [len(ids) > TEXT_LENGTH for ids in full]
    for prompt, cut in zip(prompts, truncated):
        if cut:
            log.warning("prompt is longer than %d CLIP tokens and was truncated: %.60r...", TEXT_LENGTH, prompt)
    ids = tokenizer(prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                    return_tensors="pt")["input_ids"]
    return ids, truncated


def cast_module(model: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """`model.to(device, dtype)` as plain PyTorch: diffusers' own `to` warns that "modules ... should be kept in
    float32: []" on every cast, even when there are none; ours casts the whole model on purpose."""
    return nn.Module.to(model, device, dtype) if device is not None else nn.Module.to(model, dtype)
