"""Training: the Algorithm-1 objective learns, resume is exact, DDP over 2 gloo ranks keeps the ranks
identical, and the training-side motion id follows docs/METHOD.md, choices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cinemo_rt.model import UNet3D, tiny_config
from cinemo_rt.motion import mean_consecutive_ssim, motion_id_from_ssim
from cinemo_rt.schedule import make_schedule
from cinemo_rt.train import TrainConfig, diffusion_loss, train
from cinemo_rt.train.data import VideoClips


def _tiny_config(tmp_path, data_dir, **overrides) -> TrainConfig:
    values = dict(
        data_dir=str(data_dir), num_frames=3, frame_interval=(1, 2), height=16, width=16, cache_latents=True,
        text_encoder={"hidden": 32, "layers": 1, "heads": 1},
        vae={"block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16},
        vae_steps=2, vae_batch=4,
        unet={k: v for k, v in tiny_config().to_dict().items() if not k.startswith("_")},
        steps=4, batch_size=2, lr=1e-3, warmup_steps=2, ema_decay=0.9, threads=1,
        output_dir=str(tmp_path / "run"), save_every=2, log_every=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from cinemo_rt.demo_data import make_demo_dataset

    torch.set_num_threads(1)
    return make_demo_dataset(tmp_path_factory.mktemp("data"), num_clips=6, frames=5, size=16, seed=3)


def test_motion_id_from_ssim_matches_spec9():
    # clamp(floor(100 s), 80, 99); bucket = 99 - id.
    assert [motion_id_from_ssim(s) for s in (1.0, 0.995, 0.99, 0.873, 0.8, 0.5, 0.0)] == [99, 99, 99, 87, 80, 80, 80]


def test_sampler_motion_id_is_ssim_of_sampled_frames(tiny_data):
    clips = VideoClips(tiny_data, 16, 16, min_frames=3)
    g = torch.Generator().manual_seed(0)
    batch = clips.sample(4, 3, (1, 2), text_dropout=0.5, generator=g)
    assert batch.frames.shape == (4, 3, 16, 16, 3)
    for frames, clip, index, motion_id in zip(batch.frames, batch.clip_index, batch.frame_index, batch.motion_id):
        assert torch.equal(frames, clips.clips[clip][index])
        stride = int(index[1] - index[0])
        assert 1 <= stride <= 2 and torch.equal(index, index[0] + stride * torch.arange(3))
        assert motion_id == motion_id_from_ssim(mean_consecutive_ssim(frames))


def test_training_step_lowers_loss_on_fixed_batch():
    torch.manual_seed(0)
    unet = UNet3D(tiny_config()).train()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 4, 8, 8, generator=g)  # (B, 4, N, h, w)
    text = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([100, 600])
    noise = torch.randn(2, 4, 3, 8, 8, generator=g)
    motion_id = torch.tensor([85.0, 95.0])
    alphas = make_schedule()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = diffusion_loss(unet, z, text, motion_id, t, noise, alphas)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_v_prediction_target_and_saved_scheduler(tmp_path, tiny_data):
    """v = sqrt(a) eps - sqrt(1 - a) M (Salimans & Ho); the saved scheduler config tells the sampler."""
    g = torch.Generator().manual_seed(2)
    z, noise = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 2, 4, 4, generator=g)
    t, alphas = torch.tensor([10, 900]), make_schedule()
    seen = {}

    def unet(m_t, t_, text, z1, motion):
        seen["m_t"] = m_t
        return torch.zeros_like(m_t)

    loss = diffusion_loss(unet, z, None, None, t, noise, alphas, prediction_type="v_prediction")
    a = alphas[t].view(-1, 1, 1, 1, 1).float()
    residual = z[:, :, 1:] - z[:, :, :1]
    v = a.sqrt() * noise - (1 - a).sqrt() * residual
    torch.testing.assert_close(loss, v.square().mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(seen["m_t"], a.sqrt() * residual + (1 - a).sqrt() * noise, rtol=1e-6, atol=1e-6)

    from cinemo_rt.backends.base import model_info
    from cinemo_rt.checkpoint import load_checkpoint

    train(_tiny_config(tmp_path, tiny_data, steps=2, prediction_type="v_prediction"))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_000002")
    assert model_info(ckpt).prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        _tiny_config(tmp_path, tiny_data, prediction_type="sample")

    # Fine-tuning with the target unset keeps the checkpoint's; resuming into another target is refused.
    folder = str(tmp_path / "run" / "checkpoints" / "step_000002")
    tuned = tmp_path / "tuned"
    train(_tiny_config(tuned, tiny_data, steps=1, save_every=1, init_from=folder, unet={}, vae_steps=0))
    assert model_info(load_checkpoint(tuned / "run" / "checkpoints" / "step_000001")).prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="resume with prediction_type 'v_prediction'"):
        train(_tiny_config(tmp_path / "again", tiny_data, steps=3, resume=folder, prediction_type="epsilon"))


def test_resume_gives_identical_next_steps(tmp_path, tiny_data):
    full = train(_tiny_config(tmp_path / "a", tiny_data))
    resumed = train(_tiny_config(tmp_path / "b", tiny_data,
                                 resume=str(tmp_path / "a" / "run" / "checkpoints" / "step_000002")))
    assert full["step"] == resumed["step"] == 4
    for (name, a), b in zip(full["unet"].state_dict().items(), resumed["unet"].state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(full["ema"].state_dict().values(), resumed["ema"].state_dict().values()):
        assert torch.equal(a, b)
    # The checkpoint folder is the released layout and loads as one.
    from cinemo_rt.checkpoint import load_checkpoint

    folder = tmp_path / "a" / "run" / "checkpoints" / "step_000004"
    ckpt = load_checkpoint(folder)
    for a, b in zip(ckpt.unet.state_dict().values(), full["ema"].state_dict().values()):
        assert torch.equal(a, b)
    assert json.loads((folder / "cinemo_rt.json").read_text())["frames"] == 2


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_stay_identical(tmp_path, tiny_data):
    cfg = _tiny_config(tmp_path, tiny_data, steps=2, save_every=100)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    script = tmp_path / "run_rank.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from cinemo_rt.train import TrainConfig, train
        result = train(TrainConfig.from_file({str(tmp_path / 'cfg.json')!r}), device="cpu")
        torch.save({{"unet": result["unet"].state_dict(), "ema": result["ema"].state_dict()}},
                   {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for part in ("unet", "ema"):
        for name, a in r0[part].items():
            assert torch.equal(a, r1[part][name]), (part, name)
    # Both ranks trained: the weights moved away from the initialisation.
    torch.manual_seed(0)
    assert any(not torch.equal(a, b) for a, b in zip(r0["unet"].values(), UNet3D(tiny_config()).state_dict().values()))


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"unet": {"layers_per_block": 1, "sample_size": 8}, "steps": 5}))
    cfg = TrainConfig.from_file(path, ["--steps", "7", "--unet.sample_size", "4", "--resume", "auto"])
    assert cfg.steps == 7 and cfg.resume == "auto" and dict(cfg.unet) == {"layers_per_block": 1, "sample_size": 4}
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_file(path, ["--stepz", "3"])


def test_gradient_checkpointing_same_gradients():
    from cinemo_rt.train.loop import enable_gradient_checkpointing

    torch.manual_seed(0)
    plain = UNet3D(tiny_config()).train()
    checkpointed = UNet3D(tiny_config()).train()
    checkpointed.load_state_dict(plain.state_dict())
    enable_gradient_checkpointing(checkpointed)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    g = torch.Generator().manual_seed(2)
    z, text = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    noise, t, m = torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([500]), torch.tensor([90.0])
    for model in (plain, checkpointed):
        diffusion_loss(model, z, text, m, t, noise, make_schedule()).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_lr_warmup_then_cosine():
    from cinemo_rt.train.loop import lr_factor

    cfg = TrainConfig(unet={"sample_size": 8}, steps=110, warmup_steps=10, lr_schedule="cosine")
    assert lr_factor(cfg, 0) == pytest.approx(0.1) and lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 60) == pytest.approx(0.5) and lr_factor(cfg, 110) == pytest.approx(0.0)
    constant = TrainConfig(unet={"sample_size": 8}, steps=110, warmup_steps=10)
    assert lr_factor(constant, 100) == 1.0


def test_training_refuses_to_write_into_the_package(tmp_path, tiny_data, caplog):
    """A training trial once replaced the bundled demo weights in place (editable install): the example
    config exports to a run folder, and the package folder is refused before any work."""
    from pathlib import Path

    import cinemo_rt
    from cinemo_rt.safe_paths import OutputError
    from cinemo_rt.train.__main__ import main as train_main

    package = Path(cinemo_rt.__file__).resolve().parent
    demo = json.loads((Path(__file__).parents[1] / "configs" / "demo.json").read_text())
    for key in ("output_dir", "export_dir", "data_dir"):
        assert package not in (Path(demo[key]).resolve().parents), (key, demo[key])

    before = {p: p.stat().st_mtime_ns for p in (package / "assets" / "demo").rglob("*")}
    for field in ("export_dir", "output_dir"):
        cfg = _tiny_config(tmp_path, tiny_data, **{field: str(package / "assets" / "demo")})
        with pytest.raises(OutputError, match="inside the cinemo_rt package"):
            train(cfg, device="cpu")
    assert {p: p.stat().st_mtime_ns for p in (package / "assets" / "demo").rglob("*")} == before
    assert train_main(["--data_dir", str(tiny_data), "--export_dir", str(package / "assets" / "demo"),
                       "--init_from", str(package / "assets" / "demo"), "--output_dir", str(tmp_path / "r")]) == 2
    assert "Choose a run folder" in caplog.text
    assert not (tmp_path / "r").exists()
