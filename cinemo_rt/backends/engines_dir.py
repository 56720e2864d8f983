"""An engines folder written by `python -m export.build_engines`, opened once: its manifest parsed and
checked, then handed to whichever engine backend runs it (layout: `cinemo_rt.manifest`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..files import read_json
from ..manifest import EnginesDirError, Manifest, contained_path  # noqa: F401  (contained_path: re-exported)


@dataclass(frozen=True)
class EnginesDir:
    folder: Path
    manifest: Manifest

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "EnginesDir":
        return cls(Path(folder), Manifest.read(folder))

    def onnx_path(self, component: str, verify: bool = True) -> Path:
        """The component's graph, contained in the folder and (by default) checked against the SHA-256 the
        build recorded: a graph replaced or damaged since is refused instead of run."""
        return self.manifest.onnx_path(self.folder, component, verify)

    def tokenizer(self):
        """The CLIP tokenizer copied into the folder at build time."""
        from ..tokenizer import CLIPTokenizer

        folder = self.folder / "tokenizer"
        if not (folder / "vocab.json").is_file():
            raise EnginesDirError(f"{self.folder} has no tokenizer/vocab.json; rebuild the engines folder")
        try:
            return CLIPTokenizer.from_folder(folder)
        except Exception as err:  # malformed vocab.json / merges.txt: the reader raises several kinds
            raise EnginesDirError(f"{folder} holds a malformed tokenizer ({type(err).__name__}: {err}); rebuild "
                                  "the engines folder") from err

    def scheduler_config(self) -> dict:
        path = self.folder / "scheduler" / "scheduler_config.json"
        return read_json(path) if path.is_file() else {}


def as_engines_dir(folder_or_dir: str | os.PathLike | EnginesDir) -> EnginesDir:
    return folder_or_dir if isinstance(folder_or_dir, EnginesDir) else EnginesDir.open(folder_or_dir)
