"""PyTorch reference model of Cinemo's video UNet."""

from .config import UNetConfig, full_config, tiny_config
from .unet import UNet3D

__all__ = ["UNet3D", "UNetConfig", "full_config", "tiny_config"]
