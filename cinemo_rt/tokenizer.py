"""The CLIP BPE tokenizer of a checkpoint's `tokenizer/` folder (vocab.json + merges.txt), run by the
`tokenizers` package (a Rust extension, a few hundredths of a second to import, against seconds for
transformers).

The pipeline it builds is transformers' `CLIPTokenizer` (version 5) step for step: NFC, whitespace runs to one
space, lower case; CLIP's split pattern, then GPT-2's byte-level alphabet; BPE with the `</w>` word suffix;
`<|startoftext|>` ... `<|endoftext|>` around each prompt. The ids are the same on any text
(tests/test_own_components.py). It is called as transformers' tokenizers are (`tokenizer(prompts, padding=...,
max_length=..., truncation=..., return_tensors="pt")["input_ids"]`), so `components.tokenize` serves both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .files import FileFormatError, read_json

SPECIAL_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>"}
TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class CLIPTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], special: dict[str, dict] | None = None):
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        self.tokens = tokens = {**{k: {"content": v} for k, v in SPECIAL_DEFAULTS.items()}, **(special or {})}
        self.special = {k: token["content"] for k, token in tokens.items()}
        backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="</w>", fuse_unk=False, unk_token=self.special["unk_token"]))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)])
        # Written in a prompt, a special token is that token: matched in the raw text unless its record says
        # `normalized` (the released SD tokenizer's start token); for a text named twice the last record counts.
        backend.add_special_tokens([AddedToken(**{"normalized": False, **token}, special=True)
                                    for token in tokens.values()])
        self.backend = backend
        self.bos_token_id = backend.token_to_id(self.special["bos_token"])
        self.eos_token_id = backend.token_to_id(self.special["eos_token"])
        self.pad_token_id = backend.token_to_id(self.special["pad_token"])
        backend.post_processor = processors.RobertaProcessing(  # start ... end around each prompt
            (self.special["eos_token"], self.eos_token_id), (self.special["bos_token"], self.bos_token_id),
            trim_offsets=False, add_prefix_space=False)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "CLIPTokenizer":
        """vocab.json and merges.txt (tokenizers' own reader), special tokens from tokenizer_config.json or
        special_tokens_map.json where given."""
        from tokenizers.models import BPE

        folder = Path(folder)
        vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        return cls(vocab, merges, _special_tokens(folder))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Each prompt's ids, start and end tokens included, untruncated."""
        return [e.ids for e in self.backend.encode_batch(list(prompts), add_special_tokens=True)]

    def __call__(self, prompts: str | list[str], padding: bool | str = False, max_length: int | None = None,
                 truncation: bool = False, return_tensors: str | None = None, verbose: bool = True) -> dict:
        """transformers' calling convention: with `truncation` a prompt keeps its first `max_length` - 2
        tokens between the start and end tokens; `padding="max_length"` pads with the pad token."""
        single = isinstance(prompts, str)
        ids = self.encode([prompts] if single else prompts)
        if truncation and max_length is not None:
            ids = [row if len(row) <= max_length else row[:max_length - 1] + [self.eos_token_id] for row in ids]
        if padding == "max_length" and max_length is not None:
            ids = [row + [self.pad_token_id] * (max_length - len(row)) for row in ids]
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.tensor(ids, dtype=torch.long)}
        return {"input_ids": ids[0] if single else ids}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """The released layout's files: vocab.json, merges.txt and the special tokens (a token with flags as
        transformers writes it: typed in tokenizer_config.json, plain in special_tokens_map.json)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.model.save(str(folder))

        def written(typed: bool) -> dict:
            return {k: t["content"] if len(t) == 1 else {**({"__type": "AddedToken"} if typed else {}), **t}
                    for k, t in self.tokens.items()}

        config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True, **written(True)}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(written(False), indent=2) + "\n", encoding="utf-8")


def _special_tokens(folder: Path) -> dict[str, dict]:
    """The special tokens a folder names, as AddedToken arguments: a plain string (matched in the raw text) or
    transformers' record {"content": ..., "normalized": ..., ...}; special_tokens_map.json wins over
    tokenizer_config.json, as in transformers."""
    found: dict[str, dict] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        for key, value in read_json(path).items():
            if key not in SPECIAL_DEFAULTS:
                continue
            record = {"content": value} if isinstance(value, str) else value
            if not isinstance(record, dict) or not isinstance(record.get("content"), str) or not record["content"]:
                raise FileFormatError(f"{path}: {key} must be a token (text); got {value!r}")
            found[key] = {k: bool(record[k]) for k in TOKEN_FLAGS if k in record} | {"content": record["content"]}
    return found
