"""Checks of user-given numbers and names, shared by the CLI (as argparse types) and the library.

Pure Python, no heavy imports: the CLI rejects bad values in milliseconds, before any model is loaded.
Each check raises ValueError with a message that names the value and the fix.
"""

from __future__ import annotations

import math
import re

MAX_FPS = 1000.0
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit values; segments add 1 per segment
_DEVICE_RE = re.compile(r"(cpu|cuda|mps)(:\d+)?")


def finite(value: float, name: str) -> float:
    """`value` as a float; NaN and infinities are refused (they make black frames, not errors)."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number; got {value}")
    return number


def text(value: str, name: str) -> str:
    """A prompt: Unicode text that encodes as UTF-8 (a command line's invalid bytes arrive as lone
    surrogates, which the tokenizer and every log line would choke on) and holds no NUL."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid UTF-8 text; re-type it or fix the terminal's encoding") from None
    if "\x00" in value:
        raise ValueError(f"{name} holds a NUL character; remove it")
    return value


def fps(value: float) -> float:
    """Frames per second: finite and in (0, MAX_FPS] (0 or inf cannot be encoded; MP4 stores a rational)."""
    number = finite(value, "fps")
    if not 0 < number <= MAX_FPS:
        raise ValueError(f"fps must be a number in (0, {MAX_FPS:g}]; got {value} (e.g. --fps 8)")
    return number


def seed(value: int, segments: int = 1) -> int:
    number = int(value)
    if not 0 <= number <= SEED_MAX - segments:
        raise ValueError(f"seed must be a whole number in 0..{SEED_MAX - segments}; got {value}")
    return number


def device_name(value: str) -> str:
    """'cpu', 'cuda', 'cuda:N' or 'mps'; anything else (a typo, 'tpu9') is refused before torch loads."""
    if not _DEVICE_RE.fullmatch(value.strip()):
        raise ValueError(f"unknown device {value!r}; use cpu, cuda or cuda:N")
    return value.strip()
