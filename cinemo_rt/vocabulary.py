"""A warning for prompt words a closed-vocabulary checkpoint has never seen.

The demo checkpoint's tokenizer knows only its captions' words (about 30); any other word is spelt out in
letters the model never learnt to read, and so silently does nothing. Full CLIP tokenizers (49,408
entries) cover open English and are not checked. `model_facts.ModelFacts.prompt_warnings` carries the same
message to the HTTP API and the Python API.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

CLOSED_VOCABULARY = 10_000  # tokenizers smaller than this were built for a fixed caption set
_WORD = re.compile(r"[a-z]+")


def caption_words(tokenizer_dir: str | os.PathLike) -> set[str] | None:
    """The whole words of a small tokenizer's vocabulary; None for a full (open) vocabulary or none."""
    path = Path(tokenizer_dir) / "vocab.json"
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # the loader reports a broken tokenizer; this is only advice
    if not isinstance(vocab, dict) or len(vocab) >= CLOSED_VOCABULARY:
        return None
    return {token[: -len("</w>")] for token in vocab if token.endswith("</w>")}


def unknown_words_message(prompt: str, known: set[str]) -> str | None:
    """The warning naming `prompt`'s words outside `known`, or None when it has none."""
    unknown = sorted({w for w in _WORD.findall(prompt.lower()) if w not in known})
    if not unknown:
        return None
    shown = ", ".join(sorted(w for w in known if len(w) > 1))
    return (f"this checkpoint's tokenizer does not know {', '.join(repr(w) for w in unknown)}: the model ignores "
            f"them. It was trained on captions made of: {shown}")


def warn_unknown_words(prompt: str, tokenizer_dir: str | os.PathLike) -> list[str]:
    """Log one warning naming the prompt's words outside a closed vocabulary; returns them."""
    known = caption_words(tokenizer_dir)
    if known is None:
        return []
    message = unknown_words_message(prompt, known)
    if message:
        log.warning("%s", message)
    return sorted({w for w in _WORD.findall(prompt.lower()) if w not in known})
