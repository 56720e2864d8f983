"""The engines folder written by `python -m export.build_engines`, as the runtime backends read it.

Layout:
    manifest.json          hashes, shapes, versions, parity figures, model info (see export/build_engines.py)
    text_encoder.onnx, unet.onnx (+ unet.onnx.data when large), vae_encoder.onnx, vae_decoder.onnx
    tokenizer/             copied from the checkpoint
    scheduler/scheduler_config.json
Shared by the ONNX Runtime and TensorRT backends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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
    return json.loads(path.read_text(encoding="utf-8"))


def model_info(folder_or_manifest: str | os.PathLike | dict) -> ModelInfo:
    """The checkpoint facts the pipeline needs, from an engines folder or its already-read manifest."""
    manifest = folder_or_manifest if isinstance(folder_or_manifest, dict) else read_manifest(folder_or_manifest)
    return ModelInfo(**manifest["model"]["info"])


def onnx_hashes(folder_or_manifest: str | os.PathLike | dict) -> dict[str, str]:
    """Component -> SHA-256 of its .onnx file as built (what TensorRT engines must have been built from)."""
    manifest = folder_or_manifest if isinstance(folder_or_manifest, dict) else read_manifest(folder_or_manifest)
    return {name: c["onnx"]["sha256"] for name, c in manifest.get("components", {}).items()
            if c.get("onnx", {}).get("sha256")}


def component_file(engines_dir: str | os.PathLike, manifest: dict, component: str, kind: str = "onnx") -> Path:
    """Path of a built artifact; raises if the manifest does not list it or the file is missing."""
    entry = manifest.get("components", {}).get(component, {}).get(kind)
    if not entry:
        raise EnginesDirError(f"{engines_dir}: no {kind} artifact for {component} in {MANIFEST}; "
                              f"rebuild with --targets including {kind}")
    path = Path(engines_dir) / entry["file"]
    if not path.is_file():
        raise EnginesDirError(f"{engines_dir}: {entry['file']} is listed in {MANIFEST} but missing")
    return path


def load_engines_tokenizer(engines_dir: str | os.PathLike):
    """The CLIP tokenizer copied into the engines folder at build time."""
    from transformers import CLIPTokenizer

    folder = Path(engines_dir) / "tokenizer"
    if not (folder / "vocab.json").is_file():
        raise EnginesDirError(f"{engines_dir} has no tokenizer/vocab.json; rebuild the engines folder")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_scheduler_config(engines_dir: str | os.PathLike) -> dict:
    path = Path(engines_dir) / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
