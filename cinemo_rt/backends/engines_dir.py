"""The engines folder written by `python -m export.build_engines`, as the runtime backends read it.

Layout:
    manifest.json          hashes, shapes, versions, parity figures, model info (see export/build_engines.py)
    text_encoder.onnx, unet.onnx (+ unet.onnx.data when large), vae_encoder.onnx, vae_decoder.onnx
    tokenizer/             copied from the checkpoint
    scheduler/scheduler_config.json
Shared by the ONNX Runtime and TensorRT backends.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..files import FileFormatError, file_sha256, read_json
from .base import ModelInfo

MANIFEST = "manifest.json"
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


class EnginesDirError(ValueError):
    """The engines folder is missing, incomplete, or was built for something else."""


def read_manifest(engines_dir: str | os.PathLike) -> dict:
    path = Path(engines_dir) / MANIFEST
    if not path.is_file():
        raise EnginesDirError(f"{engines_dir} has no {MANIFEST}; build it with "
                              f"`python -m export.build_engines --checkpoint CKPT --out {engines_dir}`")
    try:
        return read_json(path)
    except FileFormatError as err:
        raise EnginesDirError(f"{err}; rebuild the engines folder") from None


def model_info(folder_or_manifest: str | os.PathLike | dict) -> ModelInfo:
    """The checkpoint facts the pipeline needs, from an engines folder or its already-read manifest."""
    manifest = folder_or_manifest if isinstance(folder_or_manifest, dict) else read_manifest(folder_or_manifest)
    try:
        return ModelInfo(**manifest["model"]["info"])
    except (KeyError, TypeError) as err:
        raise EnginesDirError(f"{MANIFEST} has no valid model.info ({type(err).__name__}: {err}); rebuild the "
                              "engines folder") from None


def onnx_hashes(folder_or_manifest: str | os.PathLike | dict) -> dict[str, str]:
    """Component -> SHA-256 of its .onnx file as built (what TensorRT engines must have been built from)."""
    manifest = folder_or_manifest if isinstance(folder_or_manifest, dict) else read_manifest(folder_or_manifest)
    try:
        return {name: c["onnx"]["sha256"] for name, c in manifest.get("components", {}).items()
                if c.get("onnx", {}).get("sha256")}
    except (AttributeError, TypeError) as err:
        raise EnginesDirError(f"{MANIFEST}: malformed components ({err}); rebuild the engines folder") from None


def contained_path(engines_dir: str | os.PathLike, relative: object) -> Path:
    """`engines_dir / relative`, refused unless it stays inside the folder: a manifest edited to name an
    absolute path or `../..` must not load (and run) a graph from anywhere else."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        raise EnginesDirError(f"{engines_dir}: {MANIFEST} names file {relative!r}; entries must be paths inside "
                              "the engines folder. Rebuild it with `python -m export.build_engines`")
    root = Path(engines_dir).resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise EnginesDirError(f"{engines_dir}: {MANIFEST} names file {relative!r}, which resolves outside the "
                              "engines folder; refusing to load it. Rebuild with `python -m export.build_engines`")
    return path


def component_file(engines_dir: str | os.PathLike, manifest: dict, component: str, kind: str = "onnx") -> Path:
    """Path of a built artifact; raises if the manifest does not list it or the file is missing."""
    try:
        entry = manifest.get("components", {}).get(component, {}).get(kind)
    except AttributeError as err:
        raise EnginesDirError(f"{engines_dir}: malformed {MANIFEST} ({err}); rebuild the engines folder") from None
    if not entry:
        raise EnginesDirError(f"{engines_dir}: no {kind} artifact for {component} in {MANIFEST}; "
                              f"rebuild with --targets including {kind}")
    if not isinstance(entry, dict):
        raise EnginesDirError(f"{engines_dir}: malformed {kind} entry for {component} in {MANIFEST}; rebuild")
    path = contained_path(engines_dir, entry.get("file"))
    for extra in entry.get("extra_files", []) or []:
        contained_path(engines_dir, extra)
    if not path.is_file():
        raise EnginesDirError(f"{engines_dir}: {entry['file']} is listed in {MANIFEST} but missing")
    return path


def verified_onnx_file(engines_dir: str | os.PathLike, manifest: dict, component: str) -> Path:
    """The component's .onnx file, after checking it against the SHA-256 the build recorded: a graph that
    was replaced or damaged since is refused instead of run."""
    path = component_file(engines_dir, manifest, component, "onnx")
    recorded = manifest["components"][component]["onnx"].get("sha256")
    if not isinstance(recorded, str):
        raise EnginesDirError(f"{engines_dir}: {MANIFEST} records no sha256 for {path.name}; rebuild the folder")
    if file_sha256(path) != recorded:
        raise EnginesDirError(f"{path} does not match the SHA-256 recorded in {MANIFEST} (changed or damaged "
                              "since the build); rebuild with `python -m export.build_engines`")
    return path


def load_engines_tokenizer(engines_dir: str | os.PathLike):
    """The CLIP tokenizer copied into the engines folder at build time."""
    from transformers import CLIPTokenizer

    folder = Path(engines_dir) / "tokenizer"
    if not (folder / "vocab.json").is_file():
        raise EnginesDirError(f"{engines_dir} has no tokenizer/vocab.json; rebuild the engines folder")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # malformed vocab.json / merges.txt: transformers raises many kinds
        raise EnginesDirError(f"{folder} holds a malformed tokenizer ({type(err).__name__}: {err}); rebuild the "
                              "engines folder") from err


def load_scheduler_config(engines_dir: str | os.PathLike) -> dict:
    path = Path(engines_dir) / "scheduler" / "scheduler_config.json"
    return read_json(path) if path.is_file() else {}
