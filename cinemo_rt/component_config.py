"""The config of a VAE or text encoder as its config.json holds it, with the defaults of the library that wrote it.

A dict (saved back key for key, unknown keys included, so a folder round-trips) whose keys also read as
attributes (`config.scaling_factor`), as the diffusers and transformers configs do: the pipeline, the export
and the checkpoint writer read both kinds the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping


class ComponentConfig(dict):
    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def with_defaults(cls, values: Mapping, defaults: Mapping) -> "ComponentConfig":
        return cls({**defaults, **values})

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self, indent=2) + "\n", encoding="utf-8")


def whole(config: Mapping, key: str) -> int:
    """`config[key]` as a size: a whole number of at least 1 (a bool, a string or a list is the config's error)."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a whole number >= 1; got {value!r}")
    return value


def sizes(config: Mapping, key: str) -> tuple[int, ...]:
    """`config[key]` as a non-empty list of sizes."""
    value = config[key]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{key} must be a non-empty list of whole numbers; got {value!r}")
    return tuple(whole({f"{key}[{i}]": v}, f"{key}[{i}]") for i, v in enumerate(value))


def choice(config: Mapping, key: str, allowed) -> str:
    value = config[key]
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{key} {value!r} is not supported; this runtime takes {', '.join(map(repr, allowed))}")
    return value
