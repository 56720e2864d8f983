"""Reading and writing checkpoint folders in the released Cinemo layout (docs/checkpoints.md).

    model_index.json
    unet/config.json, unet/diffusion_pytorch_model.{safetensors,bin}   (or a bare cinemo.pt UNet state dict)
    vae_temporal_decoder/config.json, diffusion_pytorch_model.{safetensors,bin}   (SVD VAE, the default)
    vae/config.json, diffusion_pytorch_model.{safetensors,bin}                    (SD VAE, the alternative)
    text_encoder/config.json, {model.safetensors,pytorch_model.bin}
    tokenizer/vocab.json, merges.txt, ...
    scheduler/scheduler_config.json

Weights load from safetensors or with `torch.load(weights_only=True)`; every mismatch of every part is
collected and reported in one error.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .components import VAE, TextEncoder, cast_module
from .files import FileFormatError, give_default_mode, read_json, swap_in_folder
from .safe_paths import check_owned_folder
from .model import UNet3D, UNetConfig
from .schedule import PREDICTION_TYPES
from .text_encoder import CLIPTextModel, without_prefix
from .tokenizer import CLIPTokenizer
from .vae import AutoencoderKL, AutoencoderKLTemporalDecoder

log = logging.getLogger(__name__)

WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae_temporal_decoder": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
BARE_UNET = "cinemo.pt"
# Buffers that some checkpoints carry and current libraries rebuild themselves.
_BENIGN_EXTRA = ("embeddings.position_ids",)
# What a checkpoint folder holds (save_checkpoint and training write these); anything else is the user's.
CHECKPOINT_ENTRIES = ("model_index.json", "unet", "vae_temporal_decoder", "vae", "text_encoder", "tokenizer",
                      "scheduler", BARE_UNET, "cinemo_rt.json", "training_state.pt", "training_state.pt.tmp")


def owns_checkpoint_entry(name: str) -> bool:
    return name in CHECKPOINT_ENTRIES or (name.startswith("rng_rank") and name.endswith(".pt"))


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or does not match the model; the message lists every problem."""


@dataclass
class Checkpoint:
    unet: UNet3D
    vae: VAE
    text_encoder: TextEncoder
    scheduler_config: dict = field(default_factory=dict)
    folder: Path | None = None


# ---------------------------------------------------------------------------------------------
# State-dict files
# ---------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError (truncated or not safetensors), OSError
            raise CheckpointError(f"cannot read {path} as safetensors ({err}); the file is damaged or "
                                  "incomplete: download or copy it again") from err
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickles with code in them are refused on purpose
        raise CheckpointError(f"cannot read {path} as a weights-only PyTorch file: {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def unwrap_unet_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """`cinemo.pt` may nest the UNet under 'ema' (preferred, as the original's loader) or 'model'."""
    for key in ("ema", "model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    # DataParallel / DDP prefixes
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _find_weights(folder: Path, part: str) -> Path | None:
    for name in WEIGHT_NAMES[part]:
        if (folder / part / name).is_file():
            return folder / part / name
    return None


def _fill_rotary_buffers(model: UNet3D, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rotary `freqs` buffers are constants; checkpoints that filtered them out still load."""
    own = model.state_dict()
    return {**{k: v for k, v in own.items() if k.endswith("rotary_emb.freqs") and k not in state}, **state}


def _check_and_load(module: nn.Module, state: dict[str, torch.Tensor], part: str, problems: list[str]) -> None:
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith(_BENIGN_EXTRA)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
             for k in own if k in state and state[k].shape != own[k].shape]
    # load_state_dict would cast int64/bool into float parameters silently; such a file is not these weights.
    wrong_types = [f"{k} {state[k].dtype} (expected {own[k].dtype})" for k in own
                   if k in state and isinstance(state[k], torch.Tensor)
                   and own[k].dtype.is_floating_point != state[k].dtype.is_floating_point]
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]

    def listing(title: str, keys: list[str]) -> None:
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{part}: {title}: {shown}")

    listing("missing keys", missing)
    listing("unexpected keys", unexpected)
    listing("wrong shapes", wrong)
    listing("wrong dtypes", wrong_types)
    listing("not tensors", not_tensors)
    if not (missing or unexpected or wrong or wrong_types or not_tensors):
        module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_unet(folder: str | os.PathLike, problems: list[str] | None = None,
              weights: str | os.PathLike | None = None) -> UNet3D:
    """UNet from `unet/` (or `cinemo.pt` beside it, or an explicit `weights` file)."""
    folder = Path(folder)
    own_problems = problems if problems is not None else []
    config_path = folder / "unet" / "config.json"
    if not config_path.is_file():
        own_problems.append(f"unet: missing {config_path.relative_to(folder)}")
        if problems is None:
            raise CheckpointError("; ".join(own_problems))
        return None
    from .limits import check_unet_config

    try:
        mismatched = check_unet_config(folder) if weights is None else []
    except ValueError as err:  # an unreadable header or config: the same one-message report
        mismatched = [f"unet: {err}"]
    if mismatched:  # found from the weights' header, before a model of the config's size is allocated
        own_problems.extend(mismatched)
        if problems is None:
            raise CheckpointError(_format_problems(folder, own_problems))
        return None
    unet = _build(lambda: UNet3D.from_config(read_json(config_path)), config_path, "unet", own_problems)
    if unet is None:
        if problems is None:
            raise CheckpointError(_format_problems(folder, own_problems))
        return None
    weights_path = Path(weights) if weights else _find_weights(folder, "unet")
    if weights_path is None and (folder / BARE_UNET).is_file():
        weights_path = folder / BARE_UNET
    if weights_path is None:
        own_problems.append(f"unet: no weights (looked for unet/{' or unet/'.join(WEIGHT_NAMES['unet'])} "
                            f"and {BARE_UNET})")
    else:
        state = unwrap_unet_state_dict(read_state_dict(weights_path))
        _check_and_load(unet, _fill_rotary_buffers(unet, state), "unet", own_problems)
    if problems is None and own_problems:
        raise CheckpointError(_format_problems(folder, own_problems))
    return unet.eval().requires_grad_(False)


def _load_vae(folder: Path, part: str, cls, problems: list[str]):
    config_path = folder / part / "config.json"
    weights = _find_weights(folder, part)
    if not config_path.is_file() or weights is None:
        what = "config.json" if not config_path.is_file() else "weights (" + " or ".join(WEIGHT_NAMES[part]) + ")"
        problems.append(f"{part}: missing {what}")
        return None
    make = lambda: cls.from_config(read_json(config_path))  # noqa: E731
    if not _config_fits_weights(make, config_path, weights, part, problems):
        return None
    model = _build(make, config_path, part, problems)
    if model is None:
        return None
    _check_and_load(model, read_state_dict(weights), part, problems)
    return model.eval().requires_grad_(False)


OVERSIZED_PARAMETERS = 2  # a config built (without memory) at twice its weights' parameters is refused


def _config_fits_weights(make, config_path: Path, weights: Path, part: str, problems: list[str]) -> bool:
    """Before a component is built for real: its config against its safetensors header (whole numbers
    within reach of the weights' dimensions), then built on the meta device (no memory) and its parameter
    count compared with the header's. Pickled weights have no header to read; the loader compares those."""
    from .limits import component_config_problems, parameter_count, safetensors_header

    if weights.suffix != ".safetensors":
        return True
    try:
        shapes = safetensors_header(weights)
        found = component_config_problems(read_json(config_path), shapes)
    except ValueError as err:  # an unreadable header or config
        problems.append(f"{part}: {err}")
        return False
    if found:
        problems.extend(f"{part}: {config_path.name}: {p}" for p in found)
        return False
    with torch.device("meta"):
        model = _build(make, config_path, part, problems)
    if model is None:
        return False
    wanted, held = sum(p.numel() for p in model.parameters()), parameter_count(shapes)
    if wanted > OVERSIZED_PARAMETERS * max(held, 1):
        problems.append(f"{part}: {config_path} asks for {wanted:,} parameters but {weights.name} holds "
                        f"{held:,}; use the config.json that came with these weights")
        return False
    return True


def _load_text_encoder(folder: Path, problems: list[str]) -> TextEncoder | None:
    tokenizer_dir = folder / "tokenizer"
    tokenizer = None
    if not (tokenizer_dir / "vocab.json").is_file() or not (tokenizer_dir / "merges.txt").is_file():
        problems.append("tokenizer: missing vocab.json or merges.txt")
    else:
        tokenizer = _build(lambda: CLIPTokenizer.from_folder(tokenizer_dir), tokenizer_dir, "tokenizer", problems)
    config_path = folder / "text_encoder" / "config.json"
    weights = _find_weights(folder, "text_encoder")
    if not config_path.is_file() or weights is None:
        problems.append("text_encoder: missing " + ("config.json" if not config_path.is_file() else
                                                    "weights (model.safetensors or pytorch_model.bin)"))
        return None
    make = lambda: CLIPTextModel.from_config(read_json(config_path))  # noqa: E731
    if not _config_fits_weights(make, config_path, weights, "text_encoder", problems):
        return None
    model = _build(make, config_path, "text_encoder", problems)
    if model is None:
        return None
    _check_and_load(model, without_prefix(read_state_dict(weights)), "text_encoder", problems)
    if tokenizer is None:
        return None
    return TextEncoder(tokenizer=tokenizer, model=model.eval().requires_grad_(False))


def _build(make, source: Path, part: str, problems: list[str]):
    """`make()` a model or tokenizer from a config; a malformed file (bad JSON, zero or negative sizes, wrong
    types) becomes one listed problem naming the file instead of a traceback from deep inside a library."""
    try:
        return make()
    except FileFormatError as err:
        problems.append(f"{part}: {err}")
    except Exception as err:  # noqa: BLE001 - any failure to build from a user's config is that config's fault
        problems.append(f"{part}: {source} cannot build the model ({type(err).__name__}: {err})")
    return None


def _format_problems(folder: Path, problems: list[str]) -> str:
    lines = "\n  - ".join(problems)
    return (f"checkpoint folder {folder} is incomplete or does not match the model:\n  - {lines}\n"
            "Expected the released Cinemo layout (unet/, vae_temporal_decoder/ or vae/, text_encoder/, "
            "tokenizer/, scheduler/); see docs/checkpoints.md.")


def import_component_libraries() -> None:
    """Import what `load_checkpoint` builds the tokenizer with (the `tokenizers` extension), so that the CLI
    times it as an import, apart from reading the weights. The VAE and text encoder are this package's own
    modules, imported with this one (diffusers and transformers would cost seconds to import on a CPU)."""
    import tokenizers  # noqa: F401


def load_checkpoint(folder: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, temporal_vae: bool | None = None,
                    vae_encode_dtype: torch.dtype | None = torch.float32,
                    unet_weights: str | os.PathLike | None = None) -> Checkpoint:
    """Load every part of a checkpoint folder; raise one `CheckpointError` listing all problems.

    temporal_vae: None prefers `vae_temporal_decoder/` and falls back to `vae/`.
    vae_encode_dtype: the VAE encodes in this precision (the original encodes in fp64 for DCTInit; fp32
    is the default here, fp64 is accepted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; pass --checkpoint DIR with the "
                              "released layout (see docs/checkpoints.md)")
    problems: list[str] = []
    unet = load_unet(folder, problems, weights=unet_weights)
    if temporal_vae is None:
        temporal_vae = (folder / "vae_temporal_decoder").is_dir() or not (folder / "vae").is_dir()
    vae_part, vae_cls = (("vae_temporal_decoder", AutoencoderKLTemporalDecoder) if temporal_vae
                         else ("vae", AutoencoderKL))
    vae_model = _load_vae(folder, vae_part, vae_cls, problems)
    text = _load_text_encoder(folder, problems)
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(scheduler_path) if scheduler_path.is_file() else {}
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        problems.append(f"{scheduler_path}: prediction_type {prediction!r} is not supported; the sampler takes "
                        "'epsilon' (Cinemo) or 'v_prediction'")
    if problems:
        raise CheckpointError(_format_problems(folder, problems))

    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.float32
    unet = unet.to(device, dtype)
    vae = VAE.create(cast_module(vae_model, device, dtype), temporal=temporal_vae, encode_dtype=vae_encode_dtype)
    text.model.to(device, dtype)
    log.info("loaded checkpoint %s (%s VAE) on %s in %s", folder, vae_part, device, dtype)
    return Checkpoint(unet=unet, vae=vae, text_encoder=text, scheduler_config=scheduler_config, folder=folder)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (the one rotary buffer listed 16 times, or q/k/v
    views into one fused weight made by the fast backend): copy those."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        value = value.detach().cpu()
        storage = value.untyped_storage().data_ptr()
        out[key] = value.clone(memory_format=torch.contiguous_format) if storage in seen else value.contiguous()
        seen.add(storage)
    return out


def _save_weights(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(_unshared(module.state_dict()), str(path), metadata={"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_checkpoint_folder(target: Path, build) -> None:
    """Build a folder next to `target` with `build(tmp_dir)` and swap it in only when complete. An existing
    `target` is replaced only when it holds nothing but checkpoint files (the user's other files are never
    deleted: such a folder is refused before any work)."""
    target = Path(target)
    check_owned_folder(target, owns_checkpoint_entry, "a checkpoint")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        give_default_mode(tmp)
        build(tmp)
        for path in tmp.rglob("*"):
            give_default_mode(path)  # safetensors writes its files 0600; the checkpoint is the user's to share
        swap_in_folder(tmp, target, lambda dest: check_owned_folder(dest, owns_checkpoint_entry, "a checkpoint"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(folder: str | os.PathLike, checkpoint: Checkpoint) -> Path:
    """Write the released layout, all weights as safetensors; atomic at the folder level."""
    folder = Path(folder)

    def build(tmp: Path) -> None:
        unet_dir = tmp / "unet"
        unet_dir.mkdir()
        _write_json(unet_dir / "config.json", checkpoint.unet.config.to_dict())
        _save_weights(checkpoint.unet, unet_dir / WEIGHT_NAMES["unet"][0])

        vae_part = "vae_temporal_decoder" if checkpoint.vae.temporal else "vae"
        vae_dir = tmp / vae_part
        vae_dir.mkdir()
        # `_use_default_values` is diffusers' bookkeeping; saved, it would make `from_config` ignore values set
        # after construction (e.g. a scaling factor registered by training).
        vae_config = {k: v for k, v in checkpoint.vae.model.config.items() if k != "_use_default_values"}
        _write_json(vae_dir / "config.json", vae_config)
        _save_weights(checkpoint.vae.model, vae_dir / WEIGHT_NAMES[vae_part][0])

        text = checkpoint.text_encoder
        text_dir = tmp / "text_encoder"
        text_dir.mkdir()
        text.model.config.to_json_file(str(text_dir / "config.json"))
        _save_weights(text.model, text_dir / WEIGHT_NAMES["text_encoder"][0])
        text.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        # The released layout has vocab.json + merges.txt; recent transformers only writes tokenizer.json.
        if not (tmp / "tokenizer" / "vocab.json").is_file():
            text.tokenizer.backend_tokenizer.model.save(str(tmp / "tokenizer"))

        sched_dir = tmp / "scheduler"
        sched_dir.mkdir()
        _write_json(sched_dir / "scheduler_config.json", checkpoint.scheduler_config or default_scheduler_config())
        _write_json(tmp / "model_index.json", {
            "_class_name": "CinemoPipeline", "_cinemo_rt": "released layout",
            "unet": ["cinemo_rt", "UNet3D"], vae_part: ["diffusers", type(checkpoint.vae.model).__name__],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        })

    write_checkpoint_folder(folder, build)
    log.info("saved checkpoint to %s", folder)
    return folder


def default_scheduler_config() -> dict:
    """The DDIM settings in force in the original (docs/METHOD.md, pipeline), as a diffusers scheduler config."""
    return {
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
        "beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
        "prediction_type": "epsilon", "timestep_spacing": "leading",
    }


__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint", "load_unet",
           "read_state_dict", "unwrap_unet_state_dict", "UNetConfig"]
