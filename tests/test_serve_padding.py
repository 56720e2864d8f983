"""How serving pads a UNet call (`serve.batching.padded_rows`): by default a lone request pays for no absent rows;
`exact=True` (`--exact-batching`) pads every call to 2 x max batch rows for bit-exact batching."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cinemo_rt.serve.batching import padded_rows


@given(max_batch=st.integers(1, 16), data=st.data())
def test_padding_never_drops_rows_and_stays_under_twice_the_rows(max_batch, data):
    max_rows = 2 * max_batch
    rows = data.draw(st.integers(1, max_rows))
    assert padded_rows(rows, max_rows, exact=True) == max_rows
    padded = padded_rows(rows, max_rows, exact=False)
    assert rows <= padded <= max_rows and padded < 2 * rows
    assert padded == max_rows or padded & (padded - 1) == 0  # a power of two: few shapes for a compiled UNet
    if rows <= 2:  # a lone request: 2 rows with CFG, 1 without (or a guidance-truncated step)
        assert padded == rows


@given(rows=st.integers(-3, 0) | st.integers(9, 40))
def test_rows_outside_a_call_are_refused(rows):
    with pytest.raises(ValueError, match="rows"):
        padded_rows(rows, 8, exact=False)


def test_a_lone_request_computes_only_its_own_rows():
    """max batch 4: alone, a guided request's UNet calls have its 2 rows (not 8), and its video is the CLI's bit
    for bit; with exact batching the calls have 8."""
    pytest.importorskip("fastapi", reason="serving extras: pip install -e '.[serve]'")
    from cinemo_rt.defaults import EXAMPLE_IMAGE
    from cinemo_rt.image import load_image
    from cinemo_rt.request import Request
    from cinemo_rt.serve.runner import Runner

    image = load_image(EXAMPLE_IMAGE)
    default = Runner.open(max_batch=4)
    unet, rows = default.backend.unet, []

    def counting(*inputs):
        rows.append(inputs[0].shape[0])
        return unet(*inputs)

    request = Request(prompt="the camera pans left", seed=1, steps=3).resolve(default.defaults)
    videos = {}
    for name, runner in (("default", default), ("exact", Runner(default.animator, max_batch=4, exact=True))):
        runner.backend.unet = counting
        try:
            segment = runner.prepare(image, request)
            while not segment.done:
                runner.step([segment])
            videos[name] = runner.finish(segment)
        finally:
            runner.backend.unet = unet
        assert set(rows) == {2 if name == "default" else 8}, (name, rows)
        rows.clear()
    reference = default.animator(image, request.prompt, request.bucket, steps=3, seed=1)
    assert np.array_equal(videos["default"], reference)
    assert np.abs(videos["exact"].astype(int) - reference).max() <= 2
