"""Checks of memory and time before any work: image pixels, output size, and a checkpoint's
config against its weight file, each from headers and arithmetic, without importing torch or allocating.

A run whose estimate exceeds the memory this machine has available is refused with the estimate and the
flags that lower it; a size far from the checkpoint's own gets a warning, since the run may take minutes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from pathlib import Path
from typing import Mapping

from .files import read_json
from .settings import SIZE_FILE, Size

log = logging.getLogger(__name__)

# 64 Mpx (8192 x 8192): a decoded RGB image is 192 MB and its float copy for resizing 768 MB. Pillow's own
# bomb limit (178 Mpx) allowed a 290 KB PNG to cost 3.1 GB.
MAX_IMAGE_PIXELS = 64 * 2**20
# Hard ceilings, whatever the memory: beyond them a run is a typo, not a request.
MAX_SIDE = 8192
MAX_FRAMES = 1024
MAX_SEGMENTS = 64  # chained segments of one video (each re-runs the whole pipeline)
MAX_THREADS = 256  # CPU threads: past the cores there is nothing to gain, and each thread costs a stack
FAR_FACTOR = 4  # warn when the output has this many times the checkpoint's pixels (or frames), or 1/FAR_FACTOR
_SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # the format's own limit on the JSON header
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class LimitError(ValueError):
    """A request that would exceed a limit; the message gives the estimate and the flag that lowers it."""


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def check_image_pixels(width: int, height: int, name: str = "image") -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise LimitError(f"{name} is {height}x{width} (height x width) = {width * height / 1e6:.0f} Mpx, over the "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} Mpx limit (decoding it would take "
                         f"{gib(width * height * 3 * 5)}); downscale it first, e.g. to 2048 px a side")


# ---------------------------------------------------------------------------------------------
# Memory available and output size
# ---------------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get (MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


RUNTIME_BYTES = 600 * 2**20  # torch and PyAV imported, with room to spare: the demo run peaks at about 300 MB


def estimate_run_bytes(height: int, width: int, frames: int, *, parameters: int, base_channels: int,
                       latent_factor: int, dtype_bytes: int = 4, batch: int = 2,
                       attention_scores: bool = False) -> int:
    """Peak memory of one animation (or, with `attention_scores`, one graph export), from the sizes alone.

    The libraries; the weights; the UNet's live activations at the finest level (about 16 tensors of
    batch x frames x channels x latent pixels: resnets, norms, attention projections, skips); the VAE
    decoder's widest feature map for one frame (128 channels at full size, x4 live); the frames as float
    and uint8; and, where spatial attention scores are materialised (ONNX export and ONNX Runtime; PyTorch's
    fused attention does not), batch x frames x latent pixels^2. Measured on the demo with `cinemo-rt run
    --steps 1`: peak RSS 0.61 GiB at 128x128 (estimate 0.7), 0.83 GiB at 256x256 (estimate 0.8)."""
    latent_pixels = (height // latent_factor) * (width // latent_factor)
    activations = 16 * batch * frames * base_channels * latent_pixels * dtype_bytes
    attention = batch * frames * latent_pixels ** 2 * 4 if attention_scores else 0
    # temporal attention: one head's frames x frames scores per latent pixel (8192 frames at 16x16 took 8 GB)
    attention += batch * latent_pixels * frames ** 2 * 4
    decoder = 4 * 128 * height * width * 4
    video = (frames + 1) * height * width * 3 * (4 + 1)
    return RUNTIME_BYTES + parameters * dtype_bytes + activations + attention + decoder + video


def check_scaled_size(height: int, width: int, scale) -> None:
    """The written video (`cinemo_rt.scale.OutputScale`) keeps within the side limit too."""
    scaled_height, scaled_width = scale.size(height, width)
    if scaled_height > MAX_SIDE or scaled_width > MAX_SIDE:
        raise LimitError(f"the scaled video would be {scaled_height}x{scaled_width} (height x width), over the "
                         f"{MAX_SIDE} px limit a side; lower the scale")


def check_count(value: int, name: str, maximum: int, fix: str) -> int:
    """A user-given count (segments, threads, ...) within 1..maximum, checked before anything is allocated."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LimitError(f"{name} must be a whole number; got {value!r}")
    if not 1 <= value <= maximum:
        raise LimitError(f"{name} is {value}; it must be in 1..{maximum} ({fix})")
    return value


def check_segments(segments: int) -> int:
    return check_count(segments, "--segments", MAX_SEGMENTS, "run longer videos as separate jobs")


def check_output_size(height: int, width: int, frames: int, *, estimate: int, defaults: Mapping[str, int],
                      memory: int | None, what: str = "this run") -> None:
    """Refuse sizes past the ceilings or the memory available; warn when far from the checkpoint's size."""
    if height < 1 or width < 1 or frames < 1:
        raise LimitError(f"output size {height}x{width} (height x width), {frames} frames: each must be at "
                         "least 1; raise --height/--width/--frames")
    if height > MAX_SIDE or width > MAX_SIDE:
        raise LimitError(f"output size {height}x{width} (height x width) is over the {MAX_SIDE} px limit a side; "
                         f"lower --height/--width (this checkpoint's size is "
                         f"{defaults['height']}x{defaults['width']})")
    if frames > MAX_FRAMES:
        raise LimitError(f"--frames {frames} is over the limit of {MAX_FRAMES} per segment; lower --frames "
                         "(use --segments for longer videos)")
    if memory is not None and estimate > memory:
        raise LimitError(f"{what} at {height}x{width} (height x width), {frames} frames needs about "
                         f"{gib(estimate)} of memory; {gib(memory)} is available. Lower --height/--width/"
                         f"--frames (this checkpoint's size is {defaults['height']}x{defaults['width']}, "
                         f"{defaults['frames']} frames)")
    ratio = (height * width) / (defaults["height"] * defaults["width"])
    if ratio > FAR_FACTOR or ratio < 1 / FAR_FACTOR or frames > FAR_FACTOR * defaults["frames"]:
        log.warning("output %dx%d (height x width), %d frames is far from this checkpoint's %dx%d, %d frames: "
                    "expect a slower run (about %s of memory) and content the model was not trained for",
                    height, width, frames, defaults["height"], defaults["width"], defaults["frames"],
                    gib(estimate))


def check_job_size(folder: str | os.PathLike | None, height: int, width: int, frames: int, segments: int = 1, *,
                   engines: bool = False, dtype_bytes: int = 4, on_cpu: bool = True,
                   defaults: Mapping[str, int] | None = None) -> int:
    """The one size check of every entry point (CLI, Python API, HTTP, Ray): the ceilings, the segment count
    and the memory estimate of one segment against the memory available (on a CPU). `folder`: the
    checkpoint or engines folder whose facts size the estimate (None: the ceilings only). Returns the
    estimate in bytes (0 without a folder)."""
    check_segments(segments)
    defaults = dict(defaults or (size_defaults(folder) if folder is not None else
                                 {"height": height, "width": width, "frames": frames}))
    if folder is None or engines:
        facts = {"parameters": 0, "base_channels": 320, "latent_factor": 8}  # the released model's widths
        if engines and folder is not None:
            facts["parameters"] = sum(p.stat().st_size for p in Path(folder).glob("*.onnx*")) // 4
    else:
        facts = checkpoint_estimate_inputs(folder)
    estimate = estimate_run_bytes(height, width, frames, dtype_bytes=dtype_bytes, **facts)
    memory = available_memory() if on_cpu and folder is not None else None
    check_output_size(height, width, frames, estimate=estimate, defaults=defaults, memory=memory)
    return estimate if folder is not None else 0


# A clip's frames are scaled down to the output size: past 4K a source frame is only cost (a 959-byte GIF
# with an 8000x8000 logical screen cost 3.3 GB), and the frames an edit keeps stay within a budget.
MAX_CLIP_FRAME_PIXELS = 3840 * 2160
MAX_CLIP_BYTES = 2 * 2**30


def check_clip_frames(count: int, height: int, width: int, source: str = "the clip") -> None:
    """The frames an edit keeps from its source clip (count x height x width RGB, plus one float copy of a
    frame while resizing), from the stream's or the first frame's size, before any frame is decoded."""
    if width * height > MAX_CLIP_FRAME_PIXELS:
        raise LimitError(f"{source} has {height}x{width} (height x width) frames, over the limit of "
                         f"{MAX_CLIP_FRAME_PIXELS / 1e6:.1f} Mpx a frame (3840x2160); scale the clip down first")
    need = count * height * width * 3 + height * width * 3 * 4
    memory = available_memory()
    budget = MAX_CLIP_BYTES if memory is None else min(memory, MAX_CLIP_BYTES)
    if need > budget:
        raise LimitError(f"{source} has {height}x{width} (height x width) frames; keeping the {count} frames the "
                         f"edit reads needs about {gib(need)} of memory; the limit is {gib(budget)}. Scale the clip "
                         "down first, or lower --frames/--segments")


# ---------------------------------------------------------------------------------------------
# Weight files and configs
# ---------------------------------------------------------------------------------------------
def safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors file's header only (8-byte length + JSON); ValueError when
    the file is not a well-formed safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(_SAFETENSORS_HEADER_LIMIT, size - 8):
            raise ValueError(f"{path} is not a valid safetensors file (header length {length} for a file of "
                             f"{size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a valid safetensors file (unreadable header: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file (header is not a table)")
    tensors = {}
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path} is not a valid safetensors file (entry {name!r} has no dtype/shape/"
                             "data_offsets)") from None
        # A shape is believed only when the bytes are there: a header that lies about a shape must be
        # blamed on the file, not turned into a memory estimate that blames the requested size.
        declared = math.prod(shape) * _DTYPE_BYTES.get(dtype, 0) if all(d >= 0 for d in shape) else -1
        if dtype not in _DTYPE_BYTES or declared != end - begin or not 0 <= begin <= end <= data_bytes:
            raise ValueError(f"{path} is damaged: tensor {name!r} declares {dtype} {list(shape)} ({declared} "
                             f"bytes) but its data is bytes {begin}..{end} of {data_bytes}; download or copy "
                             "the checkpoint again")
        tensors[name] = (dtype, shape)
    return tensors


def parameter_count(shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) for _, shape in shapes.values())


def weight_bytes(shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) * _DTYPE_BYTES.get(dtype, 4) for dtype, shape in shapes.values())


def _levels(shapes: Mapping, prefix: str) -> dict[int, set[int]]:
    """{level: {resnet indices}} for keys like `down_blocks.1.resnets.0.conv1.weight`."""
    found: dict[int, set[int]] = {}
    pattern = re.compile(rf"^{prefix}\.(\d+)\.resnets\.(\d+)\.")
    for name in shapes:
        match = pattern.match(name)
        if match:
            found.setdefault(int(match[1]), set()).add(int(match[2]))
    return found


def unet_config_problems(config: Mapping, shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """Problems of a UNet `config.json` that asks for a far larger model than its weights hold, found from
    the header before the model is built (block_out_channels [4096, 8192] asked for 68 GiB; layers_per_block
    100000 never finished). Other mismatches cost little to build and are listed key by key by the loader."""
    problems = []
    channels = [c for c in config.get("block_out_channels", ()) if isinstance(c, int)]
    layers = config.get("layers_per_block")
    conv_in = shapes.get("conv_in.weight", (None, None))[1]
    if conv_in and channels and conv_in[0] != channels[0]:
        problems.append(f"block_out_channels starts at {channels[0]} but conv_in.weight has {conv_in[0]} channels")
    down = _levels(shapes, "down_blocks")
    if down and len(down) != len(channels):
        problems.append(f"block_out_channels has {len(channels)} levels but the weights have {len(down)}")
    if down and isinstance(layers, int) and any(len(indices) != layers for indices in down.values()):
        problems.append(f"layers_per_block is {layers} but the weights have "
                        f"{sorted({len(i) for i in down.values()})} resnets per down block")
    for level, width in enumerate(channels):
        shape = shapes.get(f"down_blocks.{level}.resnets.0.conv1.weight", (None, None))[1]
        if shape and shape[0] != width:
            problems.append(f"block_out_channels[{level}] is {width} but down_blocks.{level} has {shape[0]}")
    wanted, held = config_parameter_estimate(config), parameter_count(shapes)
    if wanted <= OVERSIZED_CONFIG * held:
        return []  # building it is cheap; the loader lists any mismatch key by key
    return [f"the config asks for about {wanted / 1e6:,.0f} M parameters but the weights hold {held / 1e6:,.1f} M; "
            "use the config.json that came with these weights", *problems]


OVERSIZED_CONFIG = 8  # a config estimated at 8x its weights' parameters is refused before it is built


def config_parameter_estimate(config: Mapping) -> int:
    """Rough parameter count of a UNet config (within about 2x for SD-style UNets): per level, each resnet
    (two 3x3 convolutions) and transformer (spatial, cross and temporal attention, feed-forward) holds about
    40 c^2; a level has layers_per_block of each going down and one more coming up."""
    channels = [c for c in config.get("block_out_channels", ()) if isinstance(c, int) and c > 0]
    layers = config.get("layers_per_block")
    layers = layers if isinstance(layers, int) and layers > 0 else 1
    return sum((2 * layers + 1) * 40 * c * c for c in channels)


# ---------------------------------------------------------------------------------------------
# A checkpoint folder's facts, from its JSON files and weight headers
# ---------------------------------------------------------------------------------------------
DEFAULTS_FILE = SIZE_FILE  # the name this module used first


def size_defaults(folder: str | os.PathLike | None) -> dict[str, int]:
    """A checkpoint's or engines folder's default output size (`settings.Size.from_folder`) as a dict."""
    return Size.from_folder(folder).as_dict()


def _unet_shapes(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    return safetensors_header(path) if path.is_file() else None


def engines_unet_parameters(folder: str | os.PathLike) -> int:
    """The UNet's parameter count in an engines folder, counted as a checkpoint's is (the UNet only): the
    elements of its ONNX graph's initializers (the graph alone is read, not its weights), else, without the
    onnx package, the graph's bytes over the bytes of one weight at the manifest's precision."""
    folder = Path(folder)
    try:
        import numpy as np
        import onnx

        graph = onnx.load(str(folder / "unet.onnx"), load_external_data=False).graph
        return sum(int(np.prod(tensor.dims)) for tensor in graph.initializer)
    except Exception:  # noqa: BLE001 - no onnx, or a broken graph (its loader reports that): estimate instead
        manifest = folder / "manifest.json"
        precision = read_json(manifest).get("precision", "fp32") if manifest.is_file() else "fp32"
        graph_bytes = sum(p.stat().st_size for p in folder.glob("unet.onnx*"))
        return graph_bytes // (2 if str(precision).startswith("fp16") else 4)


def checkpoint_estimate_inputs(folder: str | os.PathLike) -> dict:
    """{parameters, base_channels, latent_factor} of a checkpoint folder, from config.json files and the
    UNet's safetensors header (file size for pickled weights); the released model's where unknown."""
    folder = Path(folder)
    facts = {"parameters": 911_092_740, "base_channels": 320, "latent_factor": 8}
    unet_config = folder / "unet" / "config.json"
    if unet_config.is_file():
        channels = read_json(unet_config).get("block_out_channels")
        if isinstance(channels, list) and channels and isinstance(channels[0], int):
            facts["base_channels"] = channels[0]
    shapes = _unet_shapes(folder)
    if shapes is not None:
        facts["parameters"] = parameter_count(shapes)
    else:
        weights = [p for p in (folder / "unet" / "diffusion_pytorch_model.bin", folder / "cinemo.pt") if p.is_file()]
        if weights:
            facts["parameters"] = weights[0].stat().st_size // 4
    for part in ("vae_temporal_decoder", "vae"):
        vae_config = folder / part / "config.json"
        if vae_config.is_file():
            levels = read_json(vae_config).get("block_out_channels")
            if isinstance(levels, list) and levels:
                facts["latent_factor"] = 2 ** (len(levels) - 1)
            break
    return facts


def check_unet_config(folder: str | os.PathLike) -> list[str]:
    """Problems between `unet/config.json` and the UNet's safetensors header (empty when fine or unknown)."""
    folder = Path(folder)
    shapes = _unet_shapes(folder)
    config_path = folder / "unet" / "config.json"
    if shapes is None or not config_path.is_file():
        return []
    return [f"unet: {p}" for p in unet_config_problems(read_json(config_path), shapes)]


def component_config_problems(config: Mapping, shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """Problems of any component's config (VAE, text encoder) found before building it: every whole number
    in it (channels, layers, heads, vocabulary, positions) must be within a few times the largest tensor
    dimension or tensor count of its weight file (`config_int_ceiling`). A config of 100000 layers or
    4096-channel blocks over a small model's weights is refused here, before its cost is allocated; what
    passes is built without memory (`torch.device("meta")`) and its parameters compared by the loader."""
    ceiling = config_int_ceiling(shapes)
    problems = []

    def visit(value, key: str) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int) and value > ceiling:
            problems.append(f"{key} is {value}, far larger than anything in the weights (largest dimension "
                            f"or tensor count {ceiling // CONFIG_INT_FACTOR}); use the config.json that came "
                            "with these weights")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, f"{key}[{i}]")
        elif isinstance(value, Mapping):
            for k, item in value.items():
                visit(item, f"{key}.{k}" if key else str(k))

    visit(config, "")
    return problems


CONFIG_INT_FACTOR = 4


def config_int_ceiling(shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
    largest = max([len(shapes), 64, *(d for _, shape in shapes.values() for d in shape)])
    return CONFIG_INT_FACTOR * largest
