"""The bundled demo checkpoint: inside the package, small, in the released layout, and what
`cinemo-rt run` uses when no --checkpoint or --engines is given."""

from __future__ import annotations

import numpy as np
import pytest

from cinemo_rt.backends.base import model_info
from cinemo_rt.checkpoint import load_checkpoint
from cinemo_rt.cli import main
from cinemo_rt.defaults import DEMO_CHECKPOINT, EXAMPLE_IMAGE
from cinemo_rt.settings import Size
from cinemo_rt.video import read_video

MAX_BYTES = 20 * 2**20  # the size limit for the embedded checkpoint


def test_bundled_demo_is_small_and_loads():
    assert (DEMO_CHECKPOINT / "unet" / "config.json").is_file(), (
        f"{DEMO_CHECKPOINT} is missing: train it with `python -m cinemo_rt.train --config configs/demo.json`")
    size = sum(p.stat().st_size for p in DEMO_CHECKPOINT.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"demo checkpoint is {size / 2**20:.1f} MiB"
    ckpt = load_checkpoint(DEMO_CHECKPOINT)
    assert model_info(ckpt).prediction_type == "v_prediction"
    assert not any(p.suffix in (".bin", ".pt") for p in DEMO_CHECKPOINT.rglob("*"))  # safetensors only
    defaults = Size.from_folder(DEMO_CHECKPOINT)
    assert (defaults.height, defaults.width) == (32, 32)


def test_default_run_animates_the_example_with_the_demo(tmp_path, caplog):
    out = tmp_path / "demo.mp4"
    with caplog.at_level("INFO"):
        code = main(["run", "--image", str(EXAMPLE_IMAGE), "--prompt", "the camera pans left", "--bucket", "15",
                     "--seed", "0", "--out", str(out)])
    assert code == 0
    assert "embedded demo checkpoint" in caplog.text and "untrained" not in caplog.text
    video = read_video(out)
    defaults = Size.from_folder(DEMO_CHECKPOINT)
    assert video.shape == (defaults.frames + 1, defaults.height, defaults.width, 3)
    # It moves: the last frame differs visibly from the first (an unmoving model gives ~0 here).
    change = np.abs(video[-1].astype(np.int16) - video[0].astype(np.int16)).mean()
    assert change > 3.0, change


@pytest.mark.slow  # four 25-step videos: 4 s with 1 thread, 7 min with 2 threads under contention
def test_demo_prompt_steers_horizontal_direction():
    """The committed weights follow the direction words (benchmarks/controls.py measures this on held-out
    images; here one image, two seeds): "pan left" moves content right, "pan right" left, same noise."""
    import sys
    from pathlib import Path

    from PIL import Image

    from cinemo_rt.pipeline import Animator

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import controls

    animator = Animator.from_checkpoint(DEMO_CHECKPOINT, device="cpu")
    image = controls.fit(np.asarray(Image.open(EXAMPLE_IMAGE).convert("RGB")), 32)
    for seed in (0, 1):
        left = controls.mean_shift(animator(image, "pan left", 12, seed=seed, steps=25))[0]
        right = controls.mean_shift(animator(image, "pan right", 12, seed=seed, steps=25))[0]
        assert left - right > 0.2, (seed, left, right)


def test_python_api_states_the_demos_limits_once_per_job(caplog):
    """The Python API says what the CLI says: the model's facts, and the prompt's warnings once per job
    (an edit's empty prompt was warned twice, a chained run once per segment)."""
    from cinemo_rt import Animator

    animator = Animator.from_checkpoint()
    facts = animator.facts
    assert (facts.name, facts.height, facts.width, facts.frames) == ("demo", 32, 32, 8)
    assert "left" in facts.vocabulary and "dog" not in facts.vocabulary and "synthetic" in facts.trained_on
    with caplog.at_level("WARNING"):
        animator(EXAMPLE_IMAGE, "a dog pans left", segments=2, steps=1, seed=0)
    assert len(animator.last_warnings) == 1 and "does not know 'dog'" in animator.last_warnings[0]
    assert caplog.text.count("does not know 'dog'") == 1
    caplog.clear()
    clip = animator(EXAMPLE_IMAGE, "pan left", steps=1, seed=0)
    assert animator.last_warnings == []
    with caplog.at_level("WARNING"):
        animator.edit(clip, EXAMPLE_IMAGE, "", steps=1, seed=0)
    assert caplog.text.count("empty prompt") == 1 and animator.last_warnings[0].startswith("empty prompt")
