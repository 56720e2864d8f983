"""One export description per ONNX component (STYLE direction 5).

Each `ExportSpec` takes a graph's contract (names, dtypes: `cinemo_rt.graphs`, which the runtime feeds) and
adds its dynamic axes and a single `shapes(...)`; sample inputs, the TensorRT optimisation profiles
(`profile(...)`) and the tests all derive from it.

Decisions recorded here:
- Spatial sizes are static per build (`--height/--width`): the graphs then hold no Shape/Gather chains for
  H and W, and a runtime asked for another size fails with a clear message instead of recompiling.
- The UNet's frame count is static too: its rotary tables and relative-position buckets depend on it
  and fold to constants. `frames` means *generated* frames, x_t's F (15 released), as in the
  pipeline's defaults; the video has frames + 1 (z1 first), decoded in chunks of 14 (14 + 2).
- Batch is dynamic for the text encoder and the UNet (2 with CFG, 1 without) and the VAE encoder.
- The SVD temporal decoder reshapes by `num_frames` only symbolically (`cinemo_rt.vae.TemporalDecoder`,
  `SpatioTemporalResBlock`, as diffusers'), so one graph with a dynamic frame count N serves the 14- and 2-frame chunks;
  the pipeline keeps the reference's chunking, so temporal layers never see across a chunk boundary.
  Its input is *unscaled* latents (what `vae.model.decode` takes): `cinemo_rt.stages.decode_latents`
  divides by the scaling factor on the host, in fp32, for every backend.
- Float inputs and outputs are in the graph's precision, except `motion_id`, which stays fp32 as the
  reference's sinusoidal embedding is computed in fp32; token ids and timesteps are int64.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from cinemo_rt import graphs
from cinemo_rt.backends.base import ModelInfo, model_info
from cinemo_rt.components import TEXT_LENGTH
from cinemo_rt.graphs import FIXED_DTYPES, TextEncoderGraph, VAEDecoderGraph, VAEEncoderGraph
from cinemo_rt.settings import DECODE_CHUNK, Size

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
MAX_BATCH = 2  # CFG doubles the batch


@dataclass(frozen=True)
class Dims:
    """The build's geometry: video size in pixels, video frames, and the model's fixed sizes."""

    height: int = Size.height
    width: int = Size.width
    frames: int = Size.frames  # generated frames (x_t's F); the video has frames + 1
    info: ModelInfo = field(default_factory=ModelInfo)
    vocab_size: int = 49408

    @property
    def video_frames(self) -> int:
        return self.frames + 1  # z1 first, then the generated frames

    @property
    def latent_hw(self) -> tuple[int, int]:
        f = self.info.vae_factor
        return self.height // f, self.width // f

    @property
    def size(self) -> Size:
        return Size(self.height, self.width, self.frames)

    def as_dict(self) -> dict:
        return {"height": self.height, "width": self.width, "frames": self.frames,
                "info": self.info.__dict__, "vocab_size": self.vocab_size}


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------
ShapesFn = Callable[[Dims, int], dict[str, tuple[int, ...]]]


@dataclass(frozen=True)
class ExportSpec:
    name: str
    inputs: tuple[str, ...]
    input_dtypes: tuple[str, ...]  # "float" (graph precision), "float32" or "int64"
    outputs: tuple[str, ...]
    # input name -> {axis: (label, min, max)}; every other axis is static, fixed by `shapes`.
    dynamic: dict[str, dict[int, tuple[str, int, int]]]
    shapes_fn: ShapesFn = field(repr=False, compare=False)
    module_fn: Callable[[object], nn.Module] = field(repr=False, compare=False)
    weights_fn: Callable[[object], nn.Module] = field(repr=False, compare=False)
    nominal_batch: int = 1
    # The dynamo export failed on diffusers' VAE encoder at a dynamic batch ("Invalid ranges [2:1]", torch 2.13),
    # whose operations cinemo_rt/vae.py repeats; the TorchScript exporter traces it correctly, so that spec asks
    # for it instead of failing over each time.
    exporter: str = "dynamo"
    version: int = 2  # bump when the wrapper, export options or manifest entry change

    # -- shapes: the one place they are written -------------------------------------------------
    def shapes(self, dims: Dims, batch: int | None = None) -> dict[str, tuple[int, ...]]:
        """Input shapes for a batch (the dynamic axis' value); `batch=None` is the nominal one."""
        return self.shapes_fn(dims, self.nominal_batch if batch is None else batch)

    def profile(self, dims: Dims) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape per input, for TensorRT optimisation profiles."""
        lo = min(r[1] for axes in self.dynamic.values() for r in axes.values()) if self.dynamic else None
        hi = max(r[2] for axes in self.dynamic.values() for r in axes.values()) if self.dynamic else None
        opt = self.shapes(dims)
        if lo is None:
            return {k: (v, v, v) for k, v in opt.items()}
        low, high = self.shapes(dims, lo), self.shapes(dims, hi)
        return {k: (low[k], opt[k], high[k]) for k in self.inputs}

    def dtype(self, input_name: str, precision: str) -> torch.dtype:
        code = self.input_dtypes[self.inputs.index(input_name)]
        return PRECISIONS[precision] if code == "float" else FIXED_DTYPES[code]

    def sample_inputs(self, dims: Dims, precision: str = "fp32", batch: int | None = None,
                      seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded inputs in the ranges the pipeline feeds (fp32 first, then cast: same values per precision)."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for name, shape in self.shapes(dims, batch).items():
            out[name] = _SAMPLERS[name](shape, g, dims).to(self.dtype(name, precision))
        return out

    def torch_dynamic_shapes(self) -> dict[str, dict[int, torch.export.Dim]]:
        # torch.export treats sizes 0 and 1 specially: a Dim whose range starts at 1 is still traced at >= 2
        # and the graph stays general (checked at batch 1 by the tests).
        made: dict[str, torch.export.Dim] = {}
        out = {}
        for name in self.inputs:
            axes = {}
            for axis, (label, lo, hi) in self.dynamic.get(name, {}).items():
                if label not in made:
                    made[label] = torch.export.Dim(label, min=lo, max=max(hi, 3))
                axes[axis] = made[label]
            out[name] = axes or None
        return out

    def digest(self, dims: Dims) -> str:
        """Hash of everything in the spec that shapes the graph."""
        blob = json.dumps({"name": self.name, "inputs": self.inputs, "dtypes": self.input_dtypes,
                           "outputs": self.outputs, "dynamic": {k: {str(a): v for a, v in d.items()}
                                                               for k, d in self.dynamic.items()},
                           "shapes": self.shapes(dims), "dims": dims.as_dict(), "exporter": self.exporter,
                           "version": self.version},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def _normal(shape, g, dims):
    return torch.randn(shape, generator=g)


_SAMPLERS = {
    "ids": lambda shape, g, dims: torch.randint(0, dims.vocab_size, shape, generator=g),
    "x_t": _normal,
    "t": lambda shape, g, dims: torch.randint(0, 1000, shape, generator=g),
    "text": _normal,
    "z1": _normal,
    "motion_id": lambda shape, g, dims: torch.rand(shape, generator=g) * 20 + 80,  # 99 - bucket
    "image": lambda shape, g, dims: torch.rand(shape, generator=g) * 2 - 1,
    # Unscaled latents: std about 1 / scaling_factor, as the decoder sees them.
    "latents": lambda shape, g, dims: torch.randn(shape, generator=g) / dims.info.scaling_factor,
}


def _text_shapes(d: Dims, b: int):
    return {"ids": (b, TEXT_LENGTH)}


def _unet_shapes(d: Dims, b: int):
    h, w = d.latent_hw
    c = d.info.latent_channels
    return {"x_t": (b, c, d.frames, h, w), "t": (b,), "text": (b, TEXT_LENGTH, d.info.text_dim),
            "z1": (b, c, 1, h, w), "motion_id": (b,)}


def _vae_encoder_shapes(d: Dims, b: int):
    return {"image": (b, 3, d.height, d.width)}


def _vae_decoder_shapes(d: Dims, n: int):
    h, w = d.latent_hw
    return {"latents": (n, d.info.latent_channels, h, w)}


def _io(graph: graphs.GraphIO) -> dict:
    return {"name": graph.name, "inputs": graph.inputs, "input_dtypes": graph.input_dtypes, "outputs": graph.outputs}


TEXT_ENCODER = ExportSpec(
    **_io(graphs.TEXT_ENCODER),
    dynamic={"ids": {0: ("batch", 1, MAX_BATCH)}}, shapes_fn=_text_shapes, nominal_batch=2,
    module_fn=lambda ck: TextEncoderGraph(ck.text_encoder.model), weights_fn=lambda ck: ck.text_encoder.model)

UNET = ExportSpec(
    **_io(graphs.UNET),
    dynamic={n: {0: ("batch", 1, MAX_BATCH)} for n in ("x_t", "t", "text", "z1", "motion_id")},
    shapes_fn=_unet_shapes, module_fn=lambda ck: ck.unet, weights_fn=lambda ck: ck.unet, nominal_batch=2)

VAE_ENCODER = ExportSpec(
    **_io(graphs.VAE_ENCODER),
    dynamic={"image": {0: ("batch", 1, MAX_BATCH)}}, shapes_fn=_vae_encoder_shapes,
    module_fn=lambda ck: VAEEncoderGraph(ck.vae.model), weights_fn=lambda ck: ck.vae.model,
    exporter="torchscript")

VAE_DECODER = ExportSpec(
    **_io(graphs.VAE_DECODER),
    dynamic={"latents": {0: ("frames", 1, DECODE_CHUNK)}}, shapes_fn=_vae_decoder_shapes,
    module_fn=lambda ck: VAEDecoderGraph(ck.vae.model, ck.vae.temporal), weights_fn=lambda ck: ck.vae.model,
    nominal_batch=DECODE_CHUNK)

SPECS: dict[str, ExportSpec] = {s.name: s for s in (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER)}


def dims_for(checkpoint, height: int, width: int, frames: int) -> Dims:
    info = model_info(checkpoint)
    if height % info.vae_factor or width % info.vae_factor:
        raise ValueError(f"height and width must be multiples of {info.vae_factor}; got {height}x{width}")
    unet_factor = 2 ** (len(checkpoint.unet.config.block_out_channels) - 1)
    h, w = height // info.vae_factor, width // info.vae_factor
    if h % unet_factor or w % unet_factor:
        raise ValueError(f"latent size {h}x{w} must be a multiple of {unet_factor} (the UNet's downsampling); "
                         f"choose height and width multiples of {unet_factor * info.vae_factor}")
    return Dims(height=height, width=width, frames=frames, info=info,
                vocab_size=int(checkpoint.text_encoder.model.config.vocab_size))
