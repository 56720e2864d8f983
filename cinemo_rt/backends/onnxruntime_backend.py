"""The ONNX Runtime backend: the exported graphs of an engines folder behind the Backend protocol.

Sessions are created once, at construction. With onnxruntime-gpu and a CUDA device the CUDA execution
provider runs them and torch CUDA tensors are bound by pointer (IO binding, no host round trip);
otherwise the CPU provider runs them on numpy views. Every call is checked against the session's own
input metadata (names, rank, dtype, static dims) before it runs, so a wrong shape fails with a message
naming the input instead of deep inside ONNX Runtime (the Polygraphy runner convention, STYLE).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .engines_dir import COMPONENTS, EnginesDirError, model_info, read_manifest, verified_onnx_file

log = logging.getLogger(__name__)

_ORT_TO_TORCH = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bfloat16)": torch.bfloat16,
}


class InputError(ValueError):
    """A feed does not match what the graph was built for."""


@dataclass(frozen=True)
class _Port:
    name: str
    dtype: torch.dtype
    dims: tuple  # int for static axes, str/None for dynamic


class _Runner:
    """One ONNX Runtime session with its I/O metadata: load once, check feeds, infer."""

    def __init__(self, path: Path, component: str, providers: list, device: torch.device):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = torch.get_num_threads()  # the thread policy's choice (cinemo_rt.threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.component = component
        self.device = device
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime's InvalidProtobuf, Fail, NoSuchFile, ...
            raise EnginesDirError(f"ONNX Runtime cannot load {path} ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}); rebuild the engines "
                                  "folder") from err
        self.inputs = [_Port(i.name, _ORT_TO_TORCH[i.type], tuple(i.shape)) for i in self.session.get_inputs()]
        self.outputs = [_Port(o.name, _ORT_TO_TORCH[o.type], tuple(o.shape)) for o in self.session.get_outputs()]
        self.io_binding = device.type == "cuda"

    def check(self, feeds: dict[str, torch.Tensor]) -> None:
        names = [p.name for p in self.inputs]
        if sorted(feeds) != sorted(names):
            raise InputError(f"{self.component}: the graph takes inputs {names}, got {sorted(feeds)}")
        for port in self.inputs:
            x = feeds[port.name]
            if x.dim() != len(port.dims):
                raise InputError(f"{self.component}: input '{port.name}' must have rank {len(port.dims)} "
                                 f"{_fmt(port.dims)}, got shape {tuple(x.shape)}")
            if x.dtype != port.dtype:
                raise InputError(f"{self.component}: input '{port.name}' must be {port.dtype}, got {x.dtype}")
            for axis, (want, got) in enumerate(zip(port.dims, x.shape)):
                if isinstance(want, int) and want != got:
                    raise InputError(
                        f"{self.component}: input '{port.name}' axis {axis} is fixed at {want} in this graph "
                        f"{_fmt(port.dims)}, got shape {tuple(x.shape)}; the engines folder was built for "
                        "another size (rebuild with --height/--width/--frames)")

    def __call__(self, **feeds: torch.Tensor) -> list[torch.Tensor]:
        self.check(feeds)
        if self.io_binding:
            return self._run_bound(feeds)
        arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in feeds.items()}
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in self.session.run(None, arrays)]

    def _run_bound(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        index = self.device.index or 0
        keep = []
        for port in self.inputs:
            x = feeds[port.name].to(self.device).contiguous()
            keep.append(x)
            binding.bind_input(port.name, "cuda", index, _NP[port.dtype], list(x.shape), x.data_ptr())
        for port in self.outputs:
            binding.bind_output(port.name, "cuda", index)
        self.session.run_with_iobinding(binding)
        # ORT-allocated outputs reach torch through DLPack (no copy).
        return [torch.from_dlpack(o.to_dlpack()) if hasattr(o, "to_dlpack")
                else torch.from_numpy(o.numpy()).to(self.device) for o in binding.get_outputs()]


_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
       torch.float64: np.float64}


def _fmt(dims) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in dims) + ")"


def _providers(device: torch.device | None) -> tuple[list, torch.device]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    want_cuda = device is None or device.type == "cuda"
    if want_cuda and "CUDAExecutionProvider" in available and torch.cuda.is_available():
        device = device if device is not None else torch.device("cuda", 0)
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"], device
    if device is not None and device.type == "cuda":
        raise EnginesDirError("device cuda asked for, but onnxruntime has no CUDAExecutionProvider here "
                              f"(providers: {available}); install onnxruntime-gpu or use device='cpu'")
    return ["CPUExecutionProvider"], torch.device("cpu")


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, engines_dir: str | os.PathLike, device: str | torch.device | None = None,
                 precision: str | None = None):
        self.engines_dir = Path(engines_dir)
        self.manifest = read_manifest(self.engines_dir)
        built = self.manifest.get("precision", "fp32")
        if precision is not None and precision != built:
            raise EnginesDirError(f"{engines_dir} was built in {built}, not {precision}; rebuild with "
                                  f"--precision {precision} or pass precision=None")
        self.precision = built
        self.dtype = torch.float16 if built == "fp16" else torch.float32
        self.info = model_info(self.manifest)
        providers, self.device = _providers(torch.device(device) if device is not None else None)
        self._runners = {c: _Runner(verified_onnx_file(self.engines_dir, self.manifest, c), c, providers,
                                    self.device) for c in COMPONENTS}
        log.info("onnxruntime backend: %s, %s, providers %s", self.engines_dir, built,
                 self._runners["unet"].session.get_providers())

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype)

    def unet(self, x_t, t, text, z1, motion_id):
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=self.device).to(torch.int64).reshape(-1).expand(batch)
        motion_id = torch.as_tensor(motion_id, device=self.device).to(torch.float32).reshape(-1).expand(batch)
        (eps,) = self._runners["unet"](x_t=self._cast(x_t), t=t.contiguous(), text=self._cast(text),
                                       z1=self._cast(z1), motion_id=motion_id.contiguous())
        return eps

    def encode_image(self, image):
        mean, std = self._runners["vae_encoder"](image=self._cast(image))
        return mean, std

    def encode_text(self, ids):
        (text,) = self._runners["text_encoder"](ids=ids.to(self.device, torch.int64))
        return text

    def decode(self, latents, chunk=14):
        """Scaled latents (B, 4, F, h, w) -> images (B, 3, F, H, W): as `VAE.decode`, the division by the
        scaling factor happens here in fp32 and the temporal decoder sees `chunk` frames at a time."""
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).float()  # (B*F, C, h, w)
        flat = self._cast(flat / self.info.scaling_factor)
        decoder = self._runners["vae_decoder"]
        if not self.info.temporal_vae:
            (images,) = decoder(latents=flat)
        else:
            step = chunk or f
            images = torch.cat([decoder(latents=flat[s:s + step])[0] for s in range(0, b * f, step)])
        _, c_out, hh, ww = images.shape
        return images.view(b, f, c_out, hh, ww).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)

    def close(self) -> None:
        self._runners.clear()
