"""The PyTorch reference backend: the checkpoint's modules, run eagerly as the original code runs."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..graphs import graph_modules
from .base import Backend, model_info, ports_for


class ModuleRunner:
    """One graph as a PyTorch module: named feeds in, the outputs as a tuple, no autograd."""

    def __init__(self, graph: str, module: nn.Module):
        self.graph, self.module = graph, module
        self.inputs = ports_for(graph, next(module.parameters()).dtype)

    @torch.no_grad()
    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = self.module(*(feeds[p.name] for p in self.inputs))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def module_runners(checkpoint: Checkpoint) -> dict[str, ModuleRunner]:
    return {name: ModuleRunner(name, module) for name, module in graph_modules(checkpoint).items()}


class TorchBackend(Backend):
    def __init__(self, checkpoint: Checkpoint, name: str = "torch", runners: Mapping | None = None):
        self.checkpoint = checkpoint
        super().__init__(name, runners or module_runners(checkpoint), checkpoint.unet.conv_in.weight.device,
                         model_info(checkpoint))
