"""FLOPs of one UNet call, counted from the model, per op family: conv, linear, attention.

    python benchmarks/flops.py [--batch 2] [--frames 15] [--height 320] [--width 512]

The count runs the reference forward on the meta device under `torch.utils.flop_counter.FlopCounterMode`:
no memory, no GPU, a few seconds. FLOPs are 2 x multiply-accumulates, as FlopCounterMode counts them.
Families by ATen op: convolution -> conv; mm/addmm (every nn.Linear) -> linear; bmm/baddbmm and the SDPA
ops (q k^T and p v of spatial, cross and temporal attention) -> attention.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cinemo_rt.model import UNet3D, UNetConfig, full_config  # noqa: E402

LATENT_FACTOR = 8  # VAE downsampling: 320x512 pixels -> 40x64 latents
_FAMILIES = {
    "convolution": "conv",
    "mm": "linear", "addmm": "linear",
    "bmm": "attention", "baddbmm": "attention",
}


@dataclass(frozen=True)
class UNetFlops:
    conv: int
    linear: int
    attention: int
    other: int

    @property
    def total(self) -> int:
        return self.conv + self.linear + self.attention + self.other

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def unet_inputs(batch: int, frames: int, latent_h: int, latent_w: int, text_dim: int,
                device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> tuple:
    """(x_t, t, text, z1, motion_id) at the UNet's shapes: `frames` residual frames plus the z1 frame."""
    x_t = torch.randn(batch, 4, frames, latent_h, latent_w, device=device, dtype=dtype)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    text = torch.randn(batch, 77, text_dim, device=device, dtype=dtype)
    z1 = torch.randn(batch, 4, 1, latent_h, latent_w, device=device, dtype=dtype)
    motion_id = torch.full((batch,), 90.0, device=device)
    return x_t, t, text, z1, motion_id


def family(op_name: str) -> str:
    base = op_name.split(".")[-1] if "." in op_name else op_name
    base = str(base).removeprefix("aten::")
    if "attention" in base:
        return "attention"
    return _FAMILIES.get(base, "other")


def count_unet_flops(config: UNetConfig | None = None, batch: int = 2, frames: int = 15,
                     latent_h: int = 40, latent_w: int = 64) -> UNetFlops:
    """FLOPs of one `unet(x_t, t, text, z1, motion_id)` call; batch 2 is one CFG call."""
    from torch.utils.flop_counter import FlopCounterMode

    config = config or full_config()
    with torch.device("meta"):
        unet = UNet3D(config).eval()
    inputs = unet_inputs(batch, frames, latent_h, latent_w, config.cross_attention_dim)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(*inputs)
    totals = {"conv": 0, "linear": 0, "attention": 0, "other": 0}
    for op, flops in counter.get_flop_counts()["Global"].items():
        totals[family(str(op))] += int(flops)
    return UNetFlops(**totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="2 = one classifier-free-guidance call")
    from cinemo_rt.settings import Size

    parser.add_argument("--frames", type=int, default=Size.frames, help="residual frames (the z1 frame is added)")
    parser.add_argument("--height", type=int, default=Size.height)
    parser.add_argument("--width", type=int, default=Size.width)
    args = parser.parse_args(argv)
    flops = count_unet_flops(batch=args.batch, frames=args.frames, latent_h=args.height // LATENT_FACTOR,
                             latent_w=args.width // LATENT_FACTOR)
    print(json.dumps({k: f"{v / 1e12:.3f} TFLOP" for k, v in flops.as_dict().items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
