"""The project's own VAE, CLIP text tower and CLIP tokenizer against the diffusers / transformers originals
they replace at run time (cinemo_rt/vae.py, text_encoder.py, tokenizer.py), on the same weights.

Tolerance: relative error (max |ours - theirs| / max |theirs|) at most 1e-5 in fp32 and 1e-12 in fp64, on
random small configs and on the bundled demo checkpoint. They are in fact bit-equal (same operations in the
same order), which the demo test asserts too: the round-trip and golden tests elsewhere compare a loaded
checkpoint (ours) with an in-memory one (diffusers / transformers) with `torch.equal`. Token ids must be equal
to transformers' `CLIPTokenizer` on any text.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from cinemo_rt.defaults import DEMO_CHECKPOINT
from cinemo_rt.small_clip import DEFAULT_WORDS, write_tokenizer
from cinemo_rt.text_encoder import CLIPTextModel
from cinemo_rt.tokenizer import CLIPTokenizer
from cinemo_rt.vae import AutoencoderKL, AutoencoderKLTemporalDecoder

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    error = ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item()
    assert error <= TOLERANCE[theirs.dtype], f"relative error {error:.3g}"


def twin(reference: torch.nn.Module, ours_cls, dtype=torch.float32):
    """Our module built from the reference's config, holding its weights (key for key, strictly, in the same
    order: the engines build digests the state dict in order)."""
    config = {k: v for k, v in reference.config.items() if not k.startswith("_")}
    ours = ours_cls.from_config(config)
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours.to(dtype).eval(), reference.to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# VAEs
# ---------------------------------------------------------------------------------------------
SD_CONFIGS = [
    dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4),
    dict(block_out_channels=[8, 16, 16], layers_per_block=2, norm_num_groups=8, latent_channels=3, in_channels=4,
         out_channels=2, act_fn="gelu", mid_block_add_attention=False),
    dict(block_out_channels=[16, 16], layers_per_block=1, norm_num_groups=8, use_quant_conv=False,
         use_post_quant_conv=False, act_fn="mish"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", SD_CONFIGS)
def test_sd_vae_matches_diffusers(options, dtype):
    from diffusers import AutoencoderKL as Reference

    levels = len(options["block_out_channels"])
    torch.manual_seed(0)
    reference = Reference(down_block_types=("DownEncoderBlock2D",) * levels,
                          up_block_types=("UpDecoderBlock2D",) * levels, **options)
    _perturb_norms(reference)
    ours, reference = twin(reference, AutoencoderKL, dtype)
    image = torch.rand(2, options.get("in_channels", 3), 24, 16, dtype=dtype) * 2 - 1
    latents = torch.randn(3, options.get("latent_channels", 4), 6, 4, dtype=dtype)
    with torch.no_grad():
        mine, theirs = ours.encode(image).latent_dist, reference.encode(image).latent_dist
        assert_close(mine.mean, theirs.mean)
        assert_close(mine.std, theirs.std)
        assert_close(ours.decode(latents).sample, reference.decode(latents).sample)


TEMPORAL_CONFIGS = [
    dict(block_out_channels=[32, 32], layers_per_block=1),
    dict(block_out_channels=[32, 64], layers_per_block=2),  # two mid-block layers: the attention runs
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", TEMPORAL_CONFIGS)
def test_temporal_vae_matches_diffusers(options, dtype):
    from diffusers import AutoencoderKLTemporalDecoder as Reference

    torch.manual_seed(1)
    reference = Reference(down_block_types=("DownEncoderBlock2D",) * len(options["block_out_channels"]), **options)
    _perturb_norms(reference)
    with torch.no_grad():  # the blend weights start at 0 (alpha 0.5): make each layer's its own
        for name, p in reference.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn(1))
    ours, reference = twin(reference, AutoencoderKLTemporalDecoder, dtype)
    image = torch.rand(1, 3, 16, 16, dtype=dtype) * 2 - 1
    with torch.no_grad():
        mine, theirs = ours.encode(image).latent_dist, reference.encode(image).latent_dist
        assert_close(mine.mean, theirs.mean)
        assert_close(mine.std, theirs.std)
        for videos, frames in ((1, 14), (1, 2), (2, 3)):  # the pipeline's chunks, and two videos of 3 frames
            latents = torch.randn(videos * frames, 4, 8, 8, dtype=dtype)
            assert_close(ours.decode(latents, num_frames=frames).sample,
                         reference.decode(latents, num_frames=frames).sample)


def _perturb_norms(model: torch.nn.Module) -> None:
    """Norms start as the identity (weight 1, bias 0); random ones make their parameters count in the test."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_the_demo_vae_is_bit_equal_to_diffusers():
    from diffusers import AutoencoderKL as Reference

    config = json.loads((DEMO_CHECKPOINT / "vae" / "config.json").read_text())
    state = load_file(str(DEMO_CHECKPOINT / "vae" / "diffusion_pytorch_model.safetensors"))
    reference = Reference.from_config(config)
    reference.load_state_dict(state)
    ours, reference = twin(reference, AutoencoderKL)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = torch.randn(9, 4, 8, 8)
    with torch.no_grad():
        mine, theirs = ours.encode(image).latent_dist, reference.encode(image).latent_dist
        decoded, expected = ours.decode(latents).sample, reference.decode(latents).sample
    for a, b in ((mine.mean, theirs.mean), (mine.std, theirs.std), (decoded, expected)):
        assert_close(a, b)
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The CLIP text tower
# ---------------------------------------------------------------------------------------------
TEXT_CONFIGS = [
    dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    dict(vocab_size=300, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
         hidden_act="gelu", layer_norm_eps=1e-6),
]


def _transformers_text_model(options: dict, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel as Reference

    torch.manual_seed(seed)
    reference = Reference(CLIPTextConfig(max_position_embeddings=77, **options))
    _perturb_norms(reference)
    return reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", TEXT_CONFIGS)
def test_text_encoder_matches_transformers(options, dtype):
    reference = _transformers_text_model(options, seed=2)
    ours = CLIPTextModel.from_config(reference.config.to_dict())
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours, reference = ours.to(dtype).eval(), reference.to(dtype).eval()
    g = torch.Generator().manual_seed(3)
    for length in (77, 5, 1):
        ids = torch.randint(0, options["vocab_size"], (2, length), generator=g)
        with torch.no_grad():
            assert_close(ours(ids)[0], reference(ids)[0])


def test_the_demo_text_encoder_is_bit_equal_to_transformers():
    from transformers import CLIPTextConfig, CLIPTextModel as Reference

    config = json.loads((DEMO_CHECKPOINT / "text_encoder" / "config.json").read_text())
    state = load_file(str(DEMO_CHECKPOINT / "text_encoder" / "model.safetensors"))
    reference = Reference(CLIPTextConfig.from_dict(config)).eval()
    reference.load_state_dict(state)
    ours = CLIPTextModel.from_config(config).eval()
    ours.load_state_dict(state)
    ids = CLIPTokenizer.from_folder(DEMO_CHECKPOINT / "tokenizer")(
        ["the camera pans left", "", "a dog " * 40], padding="max_length", max_length=77, truncation=True,
        return_tensors="pt")["input_ids"]
    with torch.no_grad():
        mine, theirs = ours(ids)[0], reference(ids)[0]
    assert_close(mine, theirs)
    assert torch.equal(mine, theirs)


def test_the_released_text_model_prefix_loads(tmp_path):
    """The release's text encoder was saved by transformers 4 (`text_model.` keys, a `position_ids` buffer)."""
    from safetensors.torch import save_file

    from cinemo_rt.checkpoint import load_checkpoint

    folder = shutil.copytree(DEMO_CHECKPOINT, tmp_path / "ckpt")
    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    released = {f"text_model.{k}": v for k, v in state.items()}
    released["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(released, str(path))
    loaded = load_checkpoint(folder).text_encoder.model
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------
def _sd15_style(folder):
    """The released (SD 1.5) tokenizer's special-token files: records marked `normalized`, pad as text."""
    def record(content, typed):
        return {**({"__type": "AddedToken"} if typed else {}), "content": content, "lstrip": False,
                "normalized": True, "rstrip": False, "single_word": False}

    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": record("<|startoftext|>", True), "eos_token": record("<|endoftext|>", True),
        "unk_token": record("<|endoftext|>", True), "pad_token": "<|endoftext|>", "do_lower_case": True,
        "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": record("<|startoftext|>", False), "eos_token": record("<|endoftext|>", False),
        "unk_token": record("<|endoftext|>", False), "pad_token": "<|endoftext|>"}))


@pytest.fixture(scope="module")
def tokenizer_pairs(tmp_path_factory):
    """(ours, transformers') for the demo's tokenizer, one written for the default words, and the latter with
    the released tokenizer's special-token files."""
    from transformers import CLIPTokenizer as Reference

    written = write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", DEFAULT_WORDS)
    sd15 = shutil.copytree(written, tmp_path_factory.mktemp("tok") / "sd15")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (sd15 / name).unlink()
    _sd15_style(sd15)
    folders = [DEMO_CHECKPOINT / "tokenizer", written, sd15]
    return [(CLIPTokenizer.from_folder(f), Reference.from_pretrained(str(f), local_files_only=True)) for f in folders]


WORDS = st.sampled_from([*DEFAULT_WORDS, "Camera", "PANS", "don't", "it's", "we'll", "<|startoftext|>",
                         "<|endoftext|>", "<|ENDOFTEXT|>", "<|StartOfText|>", "12345", "3.14", "naïve", "café",
                         "東京", "😀", "e\u0301", "ﬁ", "İstanbul", "ΣΑΣ", "ß"])
SPACES = st.sampled_from([" ", "  ", "\t", "\n", "\u00a0", "\u3000", "\u2028", "", "\r\n "])
PUNCTUATION = st.sampled_from(list("!?.,;:'\"-_()[]{}<>|/\\@#$%^&*~`+=") + ["...", "!!", "'s"])
PROMPTS = st.one_of(
    st.text(max_size=60),  # any code points (surrogates excluded by hypothesis' default alphabet)
    st.lists(st.one_of(WORDS, SPACES, PUNCTUATION), max_size=40).map("".join),
    st.lists(WORDS, min_size=60, max_size=120).map(" ".join),  # longer than 77 tokens: truncated
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(PROMPTS, min_size=1, max_size=3))
def test_token_ids_equal_transformers(tokenizer_pairs, prompts):
    for ours, reference in tokenizer_pairs:
        assert ours(prompts)["input_ids"] == reference(prompts, padding=False, truncation=False,
                                                       verbose=False)["input_ids"]
        padded = ours(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert torch.equal(padded["input_ids"], expected["input_ids"])


def test_tokenizer_round_trips_through_save(tmp_path, tokenizer_pairs):
    for ours, _ in tokenizer_pairs:
        ours.save_pretrained(tmp_path / "saved")
        again = CLIPTokenizer.from_folder(tmp_path / "saved")
        prompts = ["the camera pans left", "<|STARTOFTEXT|> x", "<|ENDOFTEXT|> naïve " * 30]
        assert again(prompts)["input_ids"] == ours(prompts)["input_ids"]
        assert (again.bos_token_id, again.eos_token_id, again.pad_token_id, len(again)) == \
            (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, len(ours))


# ---------------------------------------------------------------------------------------------
# What running a checkpoint imports
# ---------------------------------------------------------------------------------------------
HEAVY = ("diffusers", "transformers", "torch._dynamo", "sympy", "scipy")
PROBE = """
import sys
from cinemo_rt.cli import main
code = main(sys.argv[1:])
print("HEAVY", sorted(m for m in {heavy!r} if m in sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize("folder", ["demo", "tiny"])
def test_running_a_checkpoint_imports_neither_diffusers_nor_transformers(folder, tiny_checkpoint_dir, tmp_path):
    """They (and the torch._dynamo, sympy and scipy they pull in) cost seconds, more than the demo's
    denoising; the demo (SD VAE) and the tiny checkpoint (SVD temporal VAE) both run without them."""
    import subprocess
    import sys
    from pathlib import Path

    from cinemo_rt.defaults import EXAMPLE_IMAGE

    checkpoint = [] if folder == "demo" else ["--checkpoint", str(tiny_checkpoint_dir), "--height", "64",
                                              "--width", "64", "--frames", "2"]
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), "run", "--image", str(EXAMPLE_IMAGE), "--prompt",
         "the camera pans left", "--steps", "2", *checkpoint, "--out", str(tmp_path / "o.mp4")],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout
