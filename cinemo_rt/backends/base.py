"""The backend seam: the four exported graphs (`cinemo_rt.graphs`), whatever runs them.

A backend is a `Backend` over a dict of runners, one per graph, each taking exactly the graph's named
inputs and returning its outputs in the graph's order. PyTorch runs the checkpoint's modules, ONNX Runtime
and TensorRT run the exported files; every runner describes its inputs as `Port`s and every call is checked
by the one `check_feeds` before it runs, so a wrong feed fails with a message naming the input.

`Backend` adds only what every backend needs the same way: casting feeds to the graph's dtypes and device,
and broadcasting a scalar t / motion id over the batch. Pipeline policy (posterior sampling, scaling,
chunking, uint8) lives above, in `cinemo_rt.stages`; the denoising loop only sees `backend.unet`.
A new backend is a module that builds the runners plus one line in `backends.registry.BACKENDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import torch

from ..errors import InputError
from ..graphs import FIXED_DTYPES, GRAPHS


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline must know about the checkpoint behind a backend."""

    scaling_factor: float = 0.18215
    temporal_vae: bool = True  # SVD temporal decoder: decode in chunks, uint8 by truncation
    text_dim: int = 768
    latent_channels: int = 4
    vae_factor: int = 8
    prediction_type: str = "epsilon"  # what the UNet returns: "epsilon" (Cinemo) or "v_prediction"


@dataclass(frozen=True)
class Port:
    """One graph input as a runner takes it: name, dtype and dims (int: static; str or None: dynamic)."""

    name: str
    dtype: torch.dtype
    dims: tuple


class Runner(Protocol):
    inputs: Sequence[Port]

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Named inputs (already checked) -> the graph's outputs, in its order."""


def _fmt(dims) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in dims) + ")"


def check_feeds(graph: str, ports: Sequence[Port], feeds: Mapping[str, torch.Tensor]) -> None:
    """Names, rank, dtype and static dims of `feeds` against a runner's ports (the Polygraphy convention)."""
    names = [p.name for p in ports]
    if sorted(feeds) != sorted(names):
        raise InputError(f"{graph}: the graph takes inputs {names}, got {sorted(feeds)}")
    for port in ports:
        x = feeds[port.name]
        if x.dim() != len(port.dims):
            raise InputError(f"{graph}: input '{port.name}' must have rank {len(port.dims)} "
                             f"{_fmt(port.dims)}, got shape {tuple(x.shape)}")
        if x.dtype != port.dtype:
            raise InputError(f"{graph}: input '{port.name}' must be {port.dtype}, got {x.dtype}")
        for axis, (want, got) in enumerate(zip(port.dims, x.shape)):
            if isinstance(want, int) and want >= 0 and want != got:
                raise InputError(
                    f"{graph}: input '{port.name}' axis {axis} is fixed at {want} in this graph "
                    f"{_fmt(port.dims)}, got shape {tuple(x.shape)}; the engines folder was built for "
                    "another size (rebuild with --height/--width/--frames)")


def ports_for(graph: str, float_dtype: torch.dtype) -> tuple[Port, ...]:
    """Ports of a graph that runs any size (the PyTorch modules): dtypes from the contract, dims dynamic."""
    io = GRAPHS[graph]
    return tuple(Port(name, float_dtype if code == "float" else FIXED_DTYPES[code], (None,) * rank)
                 for name, code, rank in zip(io.inputs, io.input_dtypes, io.input_ranks))


class Backend:
    """The four graphs behind one object: `run(graph, feeds)` plus one typed call per graph."""

    def __init__(self, name: str, runners: Mapping[str, Runner], device: torch.device, info: ModelInfo,
                 on_close: Callable[[], None] | None = None):
        missing = set(GRAPHS) - set(runners)
        if missing:
            raise ValueError(f"backend {name} has no runner for {sorted(missing)}")
        self.name = name
        self.runners = dict(runners)
        self.device = device
        self.info = info
        self._on_close = on_close

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the latents the UNet consumes."""
        return self.port("unet", "x_t").dtype

    def port(self, graph: str, name: str) -> Port:
        return next(p for p in self.runners[graph].inputs if p.name == name)

    def run(self, graph: str, feeds: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        runner = self.runners[graph]
        check_feeds(graph, runner.inputs, feeds)
        return runner(feeds)

    def _cast_and_run(self, graph: str, **tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {p.name: torch.as_tensor(tensors[p.name]).to(self.device, p.dtype)
                 for p in self.runners[graph].inputs}
        return self.run(graph, feeds)

    # -- one call per graph, in the contract's terms ------------------------------------------------
    def text_encoder(self, ids: torch.Tensor) -> torch.Tensor:
        return self._cast_and_run("text_encoder", ids=ids)[0]

    def vae_encoder(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self._cast_and_run("vae_encoder", image=image)
        return mean, std

    def unet(self, x_t, t, text, z1, motion_id) -> torch.Tensor:
        """t and motion_id may be scalars or (B,): they are broadcast over the batch here, once."""
        batch = x_t.shape[0]
        t = torch.as_tensor(t).reshape(-1).expand(batch)
        motion_id = torch.as_tensor(motion_id).reshape(-1).expand(batch)
        (eps,) = self._cast_and_run("unet", x_t=x_t, t=t, text=text, z1=z1, motion_id=motion_id)
        return eps

    def vae_decoder(self, latents: torch.Tensor) -> torch.Tensor:
        return self._cast_and_run("vae_decoder", latents=latents)[0]

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
        self.runners = {}


def model_info(checkpoint) -> ModelInfo:
    """The facts above, read off a loaded `Checkpoint` (the engines folder records the same in its manifest)."""
    vae, unet = checkpoint.vae, checkpoint.unet
    return ModelInfo(scaling_factor=vae.scaling_factor, temporal_vae=vae.temporal,
                     text_dim=unet.config.cross_attention_dim, latent_channels=unet.config.in_channels,
                     vae_factor=2 ** (len(vae.model.config.block_out_channels) - 1),
                     prediction_type=checkpoint.scheduler_config.get("prediction_type", "epsilon"))
