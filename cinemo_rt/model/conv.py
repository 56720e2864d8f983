"""The reference model's 2D convolution: nn.Conv2d (same parameters, same state dict), but on the CPU a
convolution whose output map has at most `GEMM_MAX_POSITIONS` positions runs as one matrix product.

At the deepest levels of a latent UNet (2x2 and 1x1 maps, 1280-2560 channels) oneDNN's direct convolution
reaches a third of the core's FMA rate, and at a 1x1 map it still multiplies all nine taps, eight of them with
the zero padding. As im2col + one GEMM with (batch * positions) rows and only the kernel taps that ever touch the
input, the same sums take 2.2x less time at 2x2 and 7x less at 1x1 (one thread; docs/ARCHITECTURE.md, "Memory
layout"). Dropped taps multiply padding zeros only, so the result is the convolution's up to fp32 summation
order. Larger maps, 1x1 kernels, CUDA and graph capture (tracing, ONNX export, torch.compile) keep F.conv2d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GEMM_MAX_POSITIONS = 4  # 4x4 maps are a tie with oneDNN; 2x2 and 1x1 maps win


def _capturing() -> bool:
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())


def _used_taps(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int, int, int] | None:
    """(first tap, last tap + 1, padding before, padding after) along one axis, keeping only the taps that reach
    the input for some output position (a negative padding crops the input); None when no tap does."""
    out = (size + 2 * padding - kernel) // stride + 1
    used = [k for k in range(kernel) if any(0 <= o * stride - padding + k < size for o in range(out))]
    if not used:
        return None
    first, last = used[0], used[-1] + 1
    before = padding - first
    after = (out - 1) * stride - before + (last - first) - size
    return first, last, before, after


def conv2d_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """F.conv2d (zeros padding, no dilation or groups) as im2col over the used taps + one matrix product;
    returns contiguous NCHW."""
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    rows_used, cols_used = _used_taps(h, kh, stride[0], padding[0]), _used_taps(w, kw, stride[1], padding[1])
    if rows_used is None or cols_used is None:  # every output is in the padding: bias only
        return F.conv2d(x, weight, bias, stride, padding)
    (h0, h1, top, bottom), (w0, w1, left, right) = rows_used, cols_used
    if (top, bottom, left, right) != (0, 0, 0, 0):
        x = F.pad(x, (left, right, top, bottom))
    if (h0, h1, w0, w1) != (0, kh, 0, kw):
        weight = weight[:, :, h0:h1, w0:w1]
    out_h = (x.shape[2] - (h1 - h0)) // stride[0] + 1
    out_w = (x.shape[3] - (w1 - w0)) // stride[1] + 1
    cols = F.unfold(x, (h1 - h0, w1 - w0), stride=stride)  # (N, Cin*taps, positions)
    rows = cols.transpose(1, 2).reshape(n * out_h * out_w, -1)
    weight = weight.reshape(cout, -1).t()
    y = rows @ weight if bias is None else torch.addmm(bias, rows, weight)
    return y.view(n, out_h, out_w, cout).permute(0, 3, 1, 2).contiguous()


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose CPU forward takes `conv2d_as_gemm` at small output maps."""

    def _gemm_ok(self, x: torch.Tensor) -> bool:
        if (_capturing() or x.device.type != "cpu" or x.dim() != 4 or self.kernel_size == (1, 1)
                or self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros"
                or isinstance(self.padding, str)):
            return False
        h, w = x.shape[-2:]
        out_h = (h + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
        out_w = (w + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        return 0 < out_h * out_w <= GEMM_MAX_POSITIONS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gemm_ok(x):
            return conv2d_as_gemm(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)
