"""Checkpoint folders in the released layout: round trips, the bare cinemo.pt state dict, and errors."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cinemo_rt.checkpoint import CheckpointError, load_checkpoint, load_unet
from cinemo_rt.testing import make_tiny_components


def _unet_inputs(unet, frames=3, h=8, w=8):
    g = torch.Generator().manual_seed(1)
    dim = unet.config.cross_attention_dim
    return (torch.randn(1, 4, frames, h, w, generator=g), torch.tensor([981]), torch.randn(1, 77, dim, generator=g),
            torch.randn(1, 4, 1, h, w, generator=g), torch.tensor([90.0]))


def test_layout_written(tiny_checkpoint_dir):
    for rel in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "vae_temporal_decoder/config.json", "vae_temporal_decoder/diffusion_pytorch_model.safetensors",
                "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
                "tokenizer/merges.txt", "scheduler/scheduler_config.json", "model_index.json"):
        assert (tiny_checkpoint_dir / rel).is_file(), rel


def _decode(checkpoint, latents):
    from cinemo_rt.backends.torch_backend import TorchBackend
    from cinemo_rt.stages import decode_latents

    return decode_latents(TorchBackend(checkpoint), latents)


def test_round_trip_same_outputs_as_in_memory(tiny_checkpoint_dir):
    memory = make_tiny_components(seed=0)
    loaded = load_checkpoint(tiny_checkpoint_dir)
    inputs = _unet_inputs(memory.unet)
    with torch.no_grad():
        assert torch.equal(loaded.unet(*inputs), memory.unet(*inputs))
    prompts = ["the camera pans left", ""]
    assert torch.equal(loaded.text_encoder.encode_text(prompts), memory.text_encoder.encode_text(prompts))
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    for a, b in zip(loaded.vae.encode(image), memory.vae.encode(image)):
        assert torch.equal(a, b)
    latents = torch.randn(1, 4, 16, 8, 8)
    assert torch.equal(_decode(loaded, latents), _decode(memory, latents))


def test_sd_vae_alternative_round_trip(tmp_path):
    from cinemo_rt.checkpoint import save_checkpoint

    memory = make_tiny_components(seed=3, temporal_vae=False)
    save_checkpoint(tmp_path / "sd", memory)
    loaded = load_checkpoint(tmp_path / "sd")
    # Every file gets the mode a plain open() would give it (safetensors writes 0600).
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "sd").rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path
    assert not loaded.vae.temporal and loaded.vae.rounding
    latents = torch.randn(1, 4, 3, 8, 8)
    assert torch.equal(_decode(loaded, latents), _decode(memory, latents))


@pytest.mark.parametrize("nesting", ["ema", "model", None])
def test_bare_cinemo_pt_state_dict(tiny_checkpoint_dir, tmp_path, nesting):
    folder = tmp_path / "bare"
    shutil.copytree(tiny_checkpoint_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    weights.unlink()
    # The original filtered nothing, but some exports drop the rotary buffers: both must load.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.freqs")}
    torch.save({nesting: state} if nesting else state, folder / "cinemo.pt")
    unet = load_unet(folder)
    reference = load_unet(tiny_checkpoint_dir)
    inputs = _unet_inputs(unet)
    with torch.no_grad():
        assert torch.equal(unet(*inputs), reference(*inputs))


def test_missing_parts_listed_in_one_error(tiny_checkpoint_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint_dir, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    message = str(err.value)
    assert "unet: no weights" in message and "tokenizer: missing" in message


def test_unsupported_prediction_type_is_refused(tiny_checkpoint_dir, tmp_path):
    import json

    folder = tmp_path / "sample-pred"
    shutil.copytree(tiny_checkpoint_dir, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "sample"}))
    with pytest.raises(CheckpointError, match="prediction_type 'sample' is not supported"):
        load_checkpoint(folder)


def test_wrong_shape_and_unexpected_keys_reported(tiny_checkpoint_dir, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "mismatch"
    shutil.copytree(tiny_checkpoint_dir, folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["conv_in.weight"] = torch.zeros(7, 4, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    del state["conv_out.bias"]
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    message = str(err.value)
    assert "conv_in.weight (7, 4, 3, 3)" in message
    assert "unexpected keys: extra.weight" in message
    assert "missing keys: conv_out.bias" in message


def test_pickle_with_code_is_refused(tiny_checkpoint_dir, tmp_path):
    folder = tmp_path / "pickle"
    shutil.copytree(tiny_checkpoint_dir, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"model": {"conv_in.weight": torch.zeros(1)}, "obj": _NotAllowed()}, folder / "cinemo.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_unet(folder)


def test_missing_folder_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


class _NotAllowed:
    pass


def test_released_bin_files_load_weights_only(tiny_checkpoint_dir, tmp_path):
    """The release ships PyTorch pickles (`diffusion_pytorch_model.bin`, `pytorch_model.bin`)."""
    folder = tmp_path / "bin"
    shutil.copytree(tiny_checkpoint_dir, folder)
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae_temporal_decoder", "diffusion_pytorch_model"),
                       ("text_encoder", "pytorch_model")):
        src = next((folder / part).glob("*.safetensors"))
        torch.save(load_file(str(src)), folder / part / f"{name}.bin")
        src.unlink()
    loaded = load_checkpoint(folder)
    reference = load_checkpoint(tiny_checkpoint_dir)
    inputs = _unet_inputs(loaded.unet)
    with torch.no_grad():
        assert torch.equal(loaded.unet(*inputs), reference.unet(*inputs))
    assert torch.equal(loaded.text_encoder.encode_text(["a dog"]), reference.text_encoder.encode_text(["a dog"]))


def test_config_values_set_after_construction_survive_a_round_trip(tmp_path):
    """Training registers its own VAE scaling factor; diffusers' `_use_default_values` must not undo it."""
    from cinemo_rt.checkpoint import save_checkpoint

    memory = make_tiny_components(seed=4)
    memory.vae.model.register_to_config(scaling_factor=1.5)
    save_checkpoint(tmp_path / "scaled", memory)
    assert load_checkpoint(tmp_path / "scaled").vae.scaling_factor == 1.5
