"""The optimised PyTorch backend ("torch-fast"): the reference UNet's weights, faster execution.

`optimize_unet(unet)` returns a `FastUNet` that reuses the reference modules' parameters and runs its own
forward, numerically the same function (parity tests/test_fast_torch.py), with these changes:

- Activations stay in one token layout (B, F, H, W, C) from conv_in to conv_out; 1x1 convolutions
  (proj_in/out, shortcuts) are linear layers on the tokens. The 3x3 convolutions' layout is chosen per
  device, once, with their weights converted at load and never per call (`conv_layout`): on CUDA they see
  the tokens as a channels_last (B*F, C, H, W) view, cuDNN's preferred fp16 layout; on the CPU they run in
  contiguous NCHW, the reference's layout (input copied in, output copied back to tokens), because oneDNN's
  channels_last kernels lose at the small maps of a latent UNet (2.2x slower for one 1280-channel convolution at
  2x2; both layouts measured end to end in benchmarks/cpu_paths.py, benchmarks/results/cpu_paths.md). In NCHW
  they run the reference module's forward, which at 2x2 and 1x1 maps is one GEMM (cinemo_rt/model/conv.py).
- GroupNorm (5D, statistics over all frames, and per frame) is computed on the token layout without a
  layout change: on the CPU by the built-in kernel on a channels_last view (5-8x faster than a var_mean
  formulation there), elsewhere with fp32 statistics written out, the following SiLU folded in (one fused
  kernel under torch.compile).
- q/k/v of spatial and temporal attention are one matmul: the three weights are re-pointed into a single
  (3C, C) tensor (no extra memory; the reference modules still see their own `to_q/to_k/to_v`).
- Temporal attention runs through `F.scaled_dot_product_attention` with the relative-position bias as an
  additive float mask; rotary is applied in place to q and k together. The reference pre-scales q by
  head_dim^-0.5 before rotary; rotary is linear, so the scale is passed to SDPA instead (applied in
  fp32 inside the kernel) and one elementwise pass disappears.
- Cross-attention K/V: text is constant over the denoising loop, so the K/V of all 16 blocks are computed
  once per video (`prepare(text)`) and reused by every step (the reference recomputes them every call).
- Optionally `torch.compile` (fuses GroupNorm+SiLU, GEGLU, residual adds) and, on CUDA, one CUDA graph per
  input shape for the whole UNet call (replayed each step; static input buffers).

`FastTorchBackend` runs it as the UNet graph of a `Backend`: the runner detects that it is handed the same
`text` tensor as last time (the CFG closure builds it once per video) and reuses the cached K/V.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint
from ..model.attention import BasicTransformerBlock
from ..model.config import ROTARY_DIM
from ..model.unet import UNet3D, sinusoidal_embedding
from ..residuals import frames_from_residuals
from .torch_backend import TorchBackend, module_runners

log = logging.getLogger(__name__)

# Block types named in the per-block profile (benchmarks/latency.py); one place for the names.
PROFILE_GROUPS = ("conv", "groupnorm", "layernorm", "spatial_attention", "cross_attention",
                  "temporal_attention", "geglu")


@dataclass(frozen=True)
class CrossContext:
    """Cross-attention keys and values of every transformer block for one text batch: ((B, heads, 77, d) x2)."""

    keys_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def batch(self) -> int:
        return self.keys_values[0][0].shape[0] if self.keys_values else 0


@dataclass(frozen=True)
class _TemporalConsts:
    cos: torch.Tensor  # (F, 32) compute dtype, angles rounded before cos as the reference
    sin_signed: torch.Tensor  # (F, 32): -sin on even, +sin on odd channels (pairs (x0, x1) -> (-x1, x0))
    biases: tuple[torch.Tensor, ...]  # per block (heads, F, F) relative-position bias


# ---------------------------------------------------------------------------------------------
# Layout helpers: x is (B, F, H, W, C) contiguous throughout
# ---------------------------------------------------------------------------------------------
CONV_LAYOUTS = ("channels_last", "contiguous")


def default_conv_layout(device: torch.device) -> str:
    """The 3x3 convolutions' layout on `device`: channels_last on CUDA, the reference's NCHW elsewhere
    (the module docstring says why)."""
    return "channels_last" if device.type == "cuda" else "contiguous"


def _frames_view(x: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W, C) tokens -> the (B*F, C, H, W) channels_last view of the same memory, no copy."""
    b, f, h, w, c = x.shape
    return x.reshape(b * f, h, w, c).permute(0, 3, 1, 2)


def _nchw(frames: torch.Tensor) -> torch.Tensor:
    """frames with NCHW strides. At a 1x1 map a channels_last view already counts as contiguous, so
    `.contiguous()` keeps its strides, and the convolution, reading them as channels_last, would convert its
    NCHW weight on every call (59 MB for each 1280x1280 3x3 weight)."""
    n, c, h, w = frames.shape
    if frames.stride() == (c * h * w, h * w, w, 1):
        return frames
    return frames.clone(memory_format=torch.contiguous_format)


def _conv_frames(frames: torch.Tensor, conv: nn.Conv2d, batch: int, layout: str) -> torch.Tensor:
    """conv over (B*F, C, H, W) frames in `layout` (the weight's, converted at load) -> (B, F, H', W', C')."""
    if layout == "contiguous":
        y = conv(_nchw(frames))  # the reference module's forward: one GEMM at 2x2 and 1x1 maps on the CPU
    else:
        y = F.conv2d(frames, conv.weight, conv.bias, conv.stride, conv.padding)
    bf, c, h, w = y.shape
    return y.permute(0, 2, 3, 1).reshape(batch, bf // batch, h, w, c)  # free if y is NHWC, else one copy


def _conv(x: torch.Tensor, conv: nn.Conv2d, layout: str) -> torch.Tensor:
    return _conv_frames(_frames_view(x), conv, x.shape[0], layout)


def _pointwise(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution is a linear layer over the channel axis of the token layout."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _group_norm(x: torch.Tensor, samples: int, norm: nn.GroupNorm, silu: bool = False,
                builtin: bool = False) -> torch.Tensor:
    """GroupNorm with statistics per (sample, group) over everything else; x (..., C) token layout.

    samples = B for the ResNet GroupNorms (pooled over all frames, docs/METHOD.md, the UNet), B*F for the per-frame one.
    builtin: the native kernel on a (samples, C, L, 1) channels_last view (same statistics, no copy).
    Otherwise statistics and the affine in fp32 as the native CUDA kernel (accumulation type), one rounding
    at the end: the form torch.compile fuses with the SiLU."""
    c = x.shape[-1]
    if builtin:
        view = x.reshape(samples, -1, 1, c).permute(0, 3, 1, 2)  # (S, C, L, 1) channels_last
        y = F.group_norm(view, norm.num_groups, norm.weight, norm.bias, norm.eps)
        if silu:
            y = F.silu(y, inplace=True)
        return y.permute(0, 2, 3, 1).reshape(x.shape)
    xg = x.reshape(samples, -1, norm.num_groups, c // norm.num_groups).float()  # (S, L, G, C/G)
    var, mean = torch.var_mean(xg, dim=(1, 3), keepdim=True, correction=0)
    y = ((xg - mean) * torch.rsqrt(var + norm.eps)).reshape(x.shape)
    y = y * norm.weight.float() + norm.bias.float()
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _fuse_qkv(attn: nn.Module) -> torch.Tensor:
    """Re-point to_q/to_k/to_v weights into one (3C, C) tensor; the modules keep working as before."""
    fused = torch.cat([attn.to_q.weight.data, attn.to_k.weight.data, attn.to_v.weight.data]).contiguous()
    c = attn.to_q.weight.shape[0]
    attn.to_q.weight.data, attn.to_k.weight.data, attn.to_v.weight.data = fused[:c], fused[c:2 * c], fused[2 * c:]
    return fused


# ---------------------------------------------------------------------------------------------
# The optimised UNet
# ---------------------------------------------------------------------------------------------
class FastUNet(nn.Module):
    """`fast(x_t, t, context, z1, motion_id) -> eps`, context = `fast.prepare(text)`; same weights as `unet`.

    The weights are snapshots where fused (q/k/v share storage with the reference; relative-position biases
    are built per frame count on first use): optimise after loading, not before."""

    def __init__(self, unet: UNet3D, conv_layout: str | None = None):
        super().__init__()
        device = unet.conv_in.weight.device
        conv_layout = conv_layout or default_conv_layout(device)
        if conv_layout not in CONV_LAYOUTS:
            raise ValueError(f"conv_layout {conv_layout!r}: expected one of {CONV_LAYOUTS}")
        self.conv_layout = conv_layout
        self.builtin_group_norm = device.type == "cpu"
        log.info("torch-fast on %s: 3x3 convolutions in %s, GroupNorm %s", device.type, conv_layout,
                 "built-in" if self.builtin_group_norm else "with fp32 statistics written out")
        self.unet = unet
        self.blocks: list[BasicTransformerBlock] = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
        self._index = {id(block): i for i, block in enumerate(self.blocks)}
        with torch.no_grad():
            self._qkv_spatial = [_fuse_qkv(b.attn1) for b in self.blocks]
            self._qkv_temporal = [_fuse_qkv(b.attn_temp) for b in self.blocks]
            if conv_layout == "channels_last":  # once, here: a mismatch would convert the weight every call
                for m in unet.modules():
                    if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
                        m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        self._consts: dict[tuple, _TemporalConsts] = {}
        # name -> context manager around each block type (PROFILE_GROUPS); set by benchmarks/latency.py for
        # the per-block profile of an eager call, None otherwise (then scopes cost one attribute test).
        self.scope_factory = None

    def _scope(self, name: str):
        return contextlib.nullcontext() if self.scope_factory is None else self.scope_factory(name)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # -- per-video and per-shape constants ------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, text: torch.Tensor) -> CrossContext:
        """Cross-attention K/V of every block for `text` (B, 77, D): once per video, not per step."""
        text = text.to(self.dtype)
        b, n, _ = text.shape
        kv = []
        for block in self.blocks:
            attn = block.attn2
            k = F.linear(text, attn.to_k.weight).view(b, n, attn.heads, -1).transpose(1, 2)  # (B, heads, 77, d)
            v = F.linear(text, attn.to_v.weight).view(b, n, attn.heads, -1).transpose(1, 2)
            kv.append((k, v))
        return CrossContext(tuple(kv))

    def temporal_consts(self, frames: int, device: torch.device) -> _TemporalConsts:
        """Rotary tables and relative-position biases for `frames` (z1 included). Built eagerly, before a
        compiled or graph-captured forward sees them: filling this cache inside a compiled forward would
        change what dynamo guarded on and trigger a second compile (inside CUDA-graph capture on a GPU)."""
        return self._temporal_consts(frames, self.dtype, torch.device(device))

    def _temporal_consts(self, frames: int, dtype: torch.dtype, device: torch.device) -> _TemporalConsts:
        key = (frames, dtype, device)
        if key not in self._consts:
            with torch.no_grad():
                tables = self.unet.temporal_tables(frames, dtype)  # the reference's own cos/sin/buckets
                sign = torch.tensor([-1.0, 1.0], dtype=dtype, device=device).repeat(ROTARY_DIM // 2)
                biases = tuple(b.attn_temp.time_rel_pos_bias(tables.buckets).to(dtype).contiguous()
                               for b in self.blocks)  # (heads, F, F) each
                self._consts[key] = _TemporalConsts(tables.cos, tables.sin * sign, biases)
        return self._consts[key]

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: CrossContext, z1: torch.Tensor,
                motion_id: torch.Tensor) -> torch.Tensor:
        u, c = self.unet, self.unet.config
        dtype, device = self.dtype, x_t.device
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=device)
        t = t.expand(batch) if t.dim() == 0 else t
        motion_id = torch.as_tensor(motion_id, device=device)
        motion_id = motion_id.expand(batch) if motion_id.dim() == 0 else motion_id
        if context.batch != batch:
            raise ValueError(f"cross-attention context was prepared for batch {context.batch}, UNet got {batch}")

        # Time and motion embeddings exactly as the reference (docs/METHOD.md, motion intensity).
        t_emb = sinusoidal_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(dtype)
        m_emb = sinusoidal_embedding(motion_id, c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift).to(dtype)
        emb = u.time_embedding(t_emb) + u.add_embedding(m_emb)
        emb_act = F.silu(emb)

        sample = frames_from_residuals(z1.to(dtype), x_t.to(dtype))  # (B, 4, 1+F, h, w)
        frames = sample.shape[2]
        x = sample.permute(0, 2, 3, 4, 1).contiguous()  # (B, F, h, w, 4) token layout from here on
        consts = self._temporal_consts(frames, dtype, device)
        factor = 2 ** (len(u.up_blocks) - 1)
        explicit_sizes = any(s % factor for s in x.shape[2:4])

        with self._scope("conv"):
            h = _conv(x, u.conv_in, self.conv_layout)
        skips = [h]
        for block in u.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = self._resnet(resnet, h, emb_act)
                if block.attentions is not None:
                    h = self._transformer(block.attentions[i], h, context, consts)
                skips.append(h)
            if block.downsamplers is not None:
                with self._scope("conv"):
                    h = _conv(h, block.downsamplers[0].conv, self.conv_layout)
                skips.append(h)

        mid = u.mid_block
        h = self._resnet(mid.resnets[0], h, emb_act)
        h = self._transformer(mid.attentions[0], h, context, consts)
        h = self._resnet(mid.resnets[1], h, emb_act)

        for block in u.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = torch.cat([h, skips.pop()], dim=-1)  # channel concat of the skip
                h = self._resnet(resnet, h, emb_act)
                if block.attentions is not None:
                    h = self._transformer(block.attentions[i], h, context, consts)
            if block.upsamplers is not None:
                size = tuple(skips[-1].shape[2:4]) if explicit_sizes else None
                h = self._upsample(block.upsamplers[0].conv, h, size)

        with self._scope("groupnorm"):
            h = _group_norm(h, batch, u.conv_norm_out, silu=True, builtin=self.builtin_group_norm)
        with self._scope("conv"):
            eps = _conv(h, u.conv_out, self.conv_layout)  # (B, F, h, w, 4)
        return eps[:, 1:].permute(0, 4, 1, 2, 3).contiguous()  # (B, 4, F-1, h, w): drop the z1 frame

    # -- blocks ------------------------------------------------------------------------------------------
    def _resnet(self, r, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        with self._scope("groupnorm"):
            h = _group_norm(x, batch, r.norm1, silu=True, builtin=self.builtin_group_norm)  # pooled over frames
        with self._scope("conv"):
            h = _conv(h, r.conv1, self.conv_layout)
        h = h + F.linear(emb_act, r.time_emb_proj.weight, r.time_emb_proj.bias)[:, None, None, None, :]
        with self._scope("groupnorm"):
            h = _group_norm(h, batch, r.norm2, silu=True, builtin=self.builtin_group_norm)
        with self._scope("conv"):
            h = _conv(h, r.conv2, self.conv_layout)
            shortcut = x if r.conv_shortcut is None else _pointwise(x, r.conv_shortcut)
        return h.add_(shortcut)

    def _upsample(self, conv: nn.Conv2d, x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        frames = _frames_view(x)  # (B*F, C, H, W) channels_last
        if self.conv_layout == "contiguous":
            frames = _nchw(frames)  # before the 2x upsample: a quarter of the copy after it
        if size is None:
            frames = F.interpolate(frames, scale_factor=2.0, mode="nearest")
        else:
            frames = F.interpolate(frames, size=size, mode="nearest")
        with self._scope("conv"):
            return _conv_frames(frames, conv, x.shape[0], self.conv_layout)

    def _transformer(self, tr, x: torch.Tensor, context: CrossContext, consts: _TemporalConsts) -> torch.Tensor:
        b, f, h, w, c = x.shape
        with self._scope("groupnorm"):
            # per-frame statistics, eps 1e-6
            hidden = _group_norm(x, b * f, tr.norm, builtin=self.builtin_group_norm)
        with self._scope("conv"):
            hidden = _pointwise(hidden, tr.proj_in)
        hidden = self._block(tr.transformer_blocks[0], hidden.view(b, f, h * w, c), context, consts)
        with self._scope("conv"):
            out = _pointwise(hidden, tr.proj_out)
        return out.view(b, f, h, w, c).add_(x)

    def _block(self, blk: BasicTransformerBlock, x: torch.Tensor, context: CrossContext,
               consts: _TemporalConsts) -> torch.Tensor:
        b, f, n, c = x.shape  # (B, F, H*W, C)
        index = self._index[id(blk)]
        heads = blk.attn1.heads
        d = c // heads

        # 1. Spatial self-attention over the tokens of each frame.
        with self._scope("layernorm"):
            a = _layer_norm(x, blk.norm1)
        with self._scope("spatial_attention"):
            qkv = F.linear(a, self._qkv_spatial[index]).view(b * f, n, 3, heads, d).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B*F, heads, n, d)
            o = o.transpose(1, 2).reshape(b, f, n, c)
            out = blk.attn1.to_out[0]
            x = F.linear(o, out.weight, out.bias).add_(x)

        # 2. Cross-attention: all frames of a video attend to their text, K/V from `prepare`.
        with self._scope("layernorm"):
            a = _layer_norm(x, blk.norm2)
        with self._scope("cross_attention"):
            k, v = context.keys_values[index]
            q = F.linear(a, blk.attn2.to_q.weight).view(b, f * n, heads, d).transpose(1, 2)  # (B, heads, F*n, d)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, f, n, c)
            out = blk.attn2.to_out[0]
            x = F.linear(o, out.weight, out.bias).add_(x)

        # 3. Temporal attention across the F frames at each position; projections in token layout, one copy
        #    into (3, B*n, heads, F, d) for attention.
        with self._scope("layernorm"):
            a = _layer_norm(x, blk.norm_temp)
        with self._scope("temporal_attention"):
            qkv = F.linear(a, self._qkv_temporal[index]).view(b, f, n, 3, heads, d)
            qkv = qkv.permute(3, 0, 2, 4, 1, 5).reshape(3, b * n, heads, f, d)  # copy
            rot = qkv[:2, ..., :ROTARY_DIM]  # q and k together, first 32 channels of each head
            swapped = rot.unflatten(-1, (ROTARY_DIM // 2, 2)).flip(-1).flatten(-2)  # (x0, x1) -> (x1, x0)
            rot.copy_(rot * consts.cos + swapped * consts.sin_signed)
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=consts.biases[index],
                                               scale=d ** -0.5)  # (B*n, heads, F, d)
            o = o.view(b, n, heads, f, d).permute(0, 3, 1, 2, 4).reshape(b, f, n, c)
            out = blk.attn_temp.to_out[0]
            x = F.linear(o, out.weight, out.bias).add_(x)

        # 4. GEGLU feed-forward.
        with self._scope("layernorm"):
            a = _layer_norm(x, blk.norm3)
        with self._scope("geglu"):
            proj, out = blk.ff.net[0].proj, blk.ff.net[2]
            hidden, gate = F.linear(a, proj.weight, proj.bias).chunk(2, dim=-1)
            return F.linear(hidden * F.gelu(gate), out.weight, out.bias).add_(x)


def optimize_unet(unet: UNet3D, conv_layout: str | None = None) -> FastUNet:
    """The optimised forward over `unet`'s own parameters (re-laid-out in place, values untouched).
    conv_layout: "channels_last" or "contiguous" (default: per device, `default_conv_layout`)."""
    return FastUNet(unet.eval(), conv_layout)


# ---------------------------------------------------------------------------------------------
# CUDA graph of one UNet call
# ---------------------------------------------------------------------------------------------
class _GraphedCall:
    """One CUDA graph of `fn(x_t, t, context, z1, motion_id)` for fixed shapes; inputs are copied into static
    buffers and the graph replayed. The K/V of the context are static buffers too: a new text of the same
    shape is copied in, so one graph serves every video of that shape."""

    def __init__(self, fn, x_t, t, context: CrossContext, z1, motion_id, warmup: int = 2):
        self.inputs = [x_t.clone(), t.clone(), z1.clone(), motion_id.clone()]
        self.context = CrossContext(tuple((k.clone(), v.clone()) for k, v in context.keys_values))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (cuDNN/cuBLAS autotuning, compile) off the capture
            for _ in range(warmup):
                fn(self.inputs[0], self.inputs[1], self.context, self.inputs[2], self.inputs[3])
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(self.inputs[0], self.inputs[1], self.context, self.inputs[2], self.inputs[3])

    def load_context(self, context: CrossContext) -> None:
        for (k_static, v_static), (k, v) in zip(self.context.keys_values, context.keys_values):
            k_static.copy_(k)
            v_static.copy_(v)

    def __call__(self, x_t, t, z1, motion_id) -> torch.Tensor:
        for static, value in zip(self.inputs, (x_t, t, z1, motion_id)):
            static.copy_(value)
        self.graph.replay()
        return self.output.clone()  # the static output is overwritten by the next replay


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------
def _version_of(tensor: torch.Tensor) -> int:
    """The in-place modification counter; inference-mode tensors have none (they cannot be modified outside
    inference mode), so they count as never modified."""
    try:
        return tensor._version
    except RuntimeError:
        return 0


# Inductor modes that capture CUDA graphs of their own -> the same mode without them. Used when the backend
# captures its manual graph of the whole call: Inductor's graphs nested inside that capture would fail or
# double-capture (reduce-overhead is the default mode plus cudagraph trees).
_WITHOUT_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def inductor_mode(compile_mode: str, manual_graph: bool) -> str:
    """The `torch.compile` mode to use: `compile_mode`, minus Inductor's CUDA graphs when we capture our own."""
    return _WITHOUT_CUDAGRAPHS.get(compile_mode, compile_mode) if manual_graph else compile_mode


class FastTorchBackend(TorchBackend):
    """A Backend over a Checkpoint (loaded at its target device/dtype, e.g. fp16 on CUDA) whose UNet graph is
    run by `FastUNet`; the other graphs are the reference modules. The backend owns the checkpoint: its UNet
    weights are re-laid-out in place.

    cuda_graph: capture one graph per input shape (default: on for CUDA). compile_mode: a `torch.compile`
    mode for the UNet forward (None: eager; off by default, benchmarks/latency.py measures whether it helps).
    compile_backend: the `torch.compile` backend (Inductor; "eager" runs dynamo alone, for rehearsals)."""

    def __init__(self, checkpoint: Checkpoint, cuda_graph: bool | None = None, compile_mode: str | None = None,
                 compile_backend="inductor"):
        runners = module_runners(checkpoint)
        runners["unet"] = _FastUNetRunner(self, runners["unet"].inputs)
        super().__init__(checkpoint, name="torch-fast", runners=runners)
        self.fast_unet = optimize_unet(checkpoint.unet)
        if self.device.type == "cpu":
            # Why "auto" keeps the reference for checkpoints on the CPU (backends/registry.py).
            log.info("torch-fast on the CPU: about as fast as the eager reference (the same convolutions "
                     "take most of a call; benchmarks/results/cpu_paths.md), so --backend auto runs the reference")
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.cuda_graph = cuda_graph
        self._forward = self.fast_unet
        if compile_mode is not None:
            # Modes are Inductor's: other backends take none.
            mode = inductor_mode(compile_mode, cuda_graph) if compile_backend == "inductor" else None
            self._forward = torch.compile(self.fast_unet, backend=compile_backend, mode=mode, dynamic=False)
        self._text_ref = None  # weak reference to the last text tensor seen, its version and its K/V
        self._text_version = -1
        self._context: CrossContext | None = None
        self._serial = 0  # bumped per new context: tells a graph whether its static K/V are current
        self._graphs: dict[tuple, _GraphedCall] = {}
        self._graph_text: dict[tuple, int] = {}

    # -- UNet -----------------------------------------------------------------------------------------
    def context_for(self, text: torch.Tensor) -> CrossContext:
        """Cached cross-attention K/V: recomputed only when handed a different (or modified) text tensor.
        The CFG wrapper doubles `text` once per video and hands the same tensor to every step (`Backend.unet`'s
        cast passes a tensor already in the UNet's dtype and device through as the same object)."""
        version = _version_of(text)
        if self._text_ref is None or self._text_ref() is not text or self._text_version != version:
            self._context = self.fast_unet.prepare(text)
            self._serial += 1
            self._text_ref, self._text_version = weakref.ref(text), version
        return self._context

    @torch.no_grad()
    def run_fast_unet(self, x_t, t, text, z1, motion_id) -> torch.Tensor:
        context = self.context_for(text)
        self.fast_unet.temporal_consts(x_t.shape[2] + 1, self.device)  # eager, outside compile and capture
        if not self.cuda_graph:
            return self._forward(x_t, t, context, z1, motion_id)
        key = (tuple(x_t.shape), tuple(z1.shape), tuple(context.keys_values[0][0].shape), t.dtype)
        graph = self._graphs.get(key)
        if graph is None:
            log.info("capturing a CUDA graph of the UNet for x_t %s", tuple(x_t.shape))
            graph = self._graphs[key] = _GraphedCall(self._forward, x_t, t, context, z1, motion_id)
            self._graph_text[key] = self._serial
        if self._graph_text[key] != self._serial:
            graph.load_context(context)
            self._graph_text[key] = self._serial
        return graph(x_t, t, z1, motion_id)

    def close(self) -> None:
        self._graphs.clear()
        self._context = None
        super().close()


class _FastUNetRunner:
    """The UNet graph's runner: same ports as the reference module, run by the backend's FastUNet."""

    def __init__(self, backend: FastTorchBackend, inputs):
        self.backend, self.inputs = backend, inputs

    def __call__(self, feeds):
        return (self.backend.run_fast_unet(feeds["x_t"], feeds["t"], feeds["text"], feeds["z1"], feeds["motion_id"]),)
