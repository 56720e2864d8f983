"""A small CLIP: a BPE tokenizer built for a word list and a randomly initialised text tower.

The training of the bundled demo uses it as its frozen text encoder; the tests use it in their tiny
checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .components import TEXT_LENGTH, TextEncoder

DEFAULT_WORDS = (
    "a the camera pans left right up down zooms in out rotates slowly quickly moves still scene photo "
    "of and with to clockwise counterclockwise ball car boat bird sky sea water tree clouds flowers "
    "dog cat person walking flying drifting low quality background changing"
).split()


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable characters standing for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(folder: str | os.PathLike, words: Iterable[str] = DEFAULT_WORDS) -> Path:
    """A CLIP BPE tokenizer whose vocabulary is the byte alphabet plus merges that build each given word.

    Merges build a word left to right (`c a` -> `ca`, `ca t</w>` -> `cat</w>`), so listed words become one
    token and anything else still tokenizes, character by character."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        if len(word) < 2:
            continue
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merged = left + right
            if (left, right) not in merges:
                merges.append((left, right))
                if merged not in vocab_list:
                    vocab_list.append(merged)
            left = merged
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": TEXT_LENGTH, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}), encoding="utf-8")
    return folder


def tiny_text_encoder(tokenizer_dir: Path, hidden: int = 32, layers: int = 2, heads: int = 2) -> TextEncoder:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=TEXT_LENGTH, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return TextEncoder(tokenizer=tokenizer, model=CLIPTextModel(config).eval())
