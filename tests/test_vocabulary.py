"""One request vocabulary: the CLI, the HTTP API and the Python API refuse exactly the same values, with the
same message, because each builds the same `Request`/`EditRequest` (cinemo_rt/request.py) and sizes it with
the same `limits.check_job_size`.

One table of cases (field -> the text a user types) runs through all three: `cinemo-rt run|edit` (up to the
end of its validation phase; the model is not run), `POST /v1/animations|edits` on a live app, and the
dataclasses themselves. A hypothesis class then draws values of every kind for every field and checks that
the three agree on accept/refuse."""

from __future__ import annotations

import dataclasses
import io
import logging
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="serving extras: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from cinemo_rt import cli  # noqa: E402
from cinemo_rt.defaults import EXAMPLE_IMAGE  # noqa: E402
from cinemo_rt.request import EditRequest, Request, field_types  # noqa: E402
from cinemo_rt.serve.app import ServeSettings, create_app  # noqa: E402
from cinemo_rt.serve.batching import BatchPolicy  # noqa: E402
from cinemo_rt.serve.forms import AnimationForm, EditForm, split_form  # noqa: E402
from cinemo_rt.serve.limits import RequestError, build_request  # noqa: E402
from cinemo_rt.serve.runner import Runner  # noqa: E402
from cinemo_rt.settings import Size  # noqa: E402
from cinemo_rt.validate import SEED_MAX  # noqa: E402

ACCEPTED = None
# (kind, fields as typed, a words of the message or ACCEPTED). Seeds, steps and sizes kept small where the
# case is accepted: the server queues it (the worker is held, nothing runs).
CASES = [
    ("run", {}, ACCEPTED),
    ("run", {"bucket": "0", "seed": "0"}, ACCEPTED),
    ("run", {"bucket": "19", "steps": "1000"}, ACCEPTED),
    ("run", {"motion_id": "91.5", "guidance": "-100"}, ACCEPTED),
    ("run", {"fast": "true", "steps": "4", "cache": "0"}, ACCEPTED),
    ("run", {"seed": str(SEED_MAX - 2), "segments": "2"}, ACCEPTED),
    ("run", {"height": "16", "width": "24", "frames": "1"}, ACCEPTED),
    ("run", {"sampler": "dpmpp-2m", "eta": "0"}, ACCEPTED),
    ("run", {"bucket": "20"}, "bucket must be a whole number in 0..19"),
    ("run", {"bucket": "-1"}, "bucket must be a whole number in 0..19"),
    ("run", {"bucket": "3", "motion_id": "90"}, "give bucket or motion_id, not both"),
    ("run", {"motion_id": "nan"}, "motion_id must be a finite number"),
    ("run", {"steps": "0"}, "steps must be in 1..1000"),
    ("run", {"steps": "1001"}, "steps must be in 1..1000"),
    ("run", {"steps": "2.5"}, "steps must be a whole number; got '2.5'"),  # the one text decoder
    ("run", {"guidance": "strong"}, "guidance must be a number; got 'strong'"),
    ("run", {"guidance": "inf"}, "guidance must be a finite number"),
    ("run", {"guidance": "100.5"}, "guidance must be in -100..100"),
    ("run", {"seed": "-1"}, "seed must be a whole number in 0.."),
    ("run", {"seed": str(SEED_MAX)}, "seed must be a whole number in 0.."),  # seed + 1 would overflow...
    ("run", {"seed": str(SEED_MAX - 1), "segments": "2"}, "seed must be a whole number in 0.."),  # ...in segment 2
    ("run", {"height": "0"}, "height must be positive and divisible by 8"),  # not "the default"
    ("run", {"width": "36"}, "width must be positive and divisible by 8"),
    ("run", {"frames": "0"}, "frames must be at least 1"),
    ("run", {"frames": "1025"}, "over the limit of 1024"),  # the model's size check, the same everywhere
    ("run", {"height": "8200"}, "over the 8192 px limit"),
    ("run", {"segments": "0"}, "segments must be at least 1"),
    ("run", {"segments": "65"}, "segments is 65; it must be in 1..64"),
    ("run", {"sampler": "euler"}, "unknown sampler 'euler'"),
    ("run", {"eta": "0.5", "sampler": "dpmpp-2m"}, "eta must be in 0..1 and applies to the ddim sampler only"),
    ("run", {"eta": "1.5"}, "eta must be in 0..1"),
    ("run", {"dct_tau": "1000"}, "dct_tau must be in 0..999"),
    ("run", {"dct_fraction": "0"}, "dct_fraction must be in (0, 1]"),
    ("run", {"cache": "-1"}, "cache threshold must be a number >= 0"),
    ("run", {"guidance_until": "1.5"}, "guidance_until must be a fraction of the steps in 0..1"),
    ("run", {"guidance_every": "0"}, "guidance_every must be a whole number of steps >= 1"),
    ("run", {"cache_reuse": "residual"}, "cache_reuse must be one of extrapolate, output"),
    ("run", {"prompt": "x" * 10_001}, "prompt has 10001 characters; the limit is 10000"),
    ("run", {"negative_prompt": "y" * 10_001}, "negative_prompt has 10001 characters"),
    ("run", {"bukket": "3"}, "bukket"),  # a misspelt field: argparse's unknown flag, the API's unknown field
    ("run", {"stride": "2"}, "stride"),  # an edit's field on an animation
    ("edit", {}, ACCEPTED),
    ("edit", {"bucket": "auto", "stride": "1", "start": "0"}, ACCEPTED),
    ("edit", {"bucket": "fast"}, "bucket must be a whole number in 0..19 or auto"),
    ("edit", {"bucket": "25"}, "bucket must be a whole number in 0..19 (larger = more motion), or auto"),
    ("edit", {"stride": "0"}, "stride must be at least 1"),
    ("edit", {"start": "-1"}, "start must be >= 0 seconds"),
    ("edit", {"inversion_guidance": "nan"}, "inversion_guidance must be a finite number"),
    ("edit", {"source_prompt": "z" * 10_001}, "source_prompt has 10001 characters"),
    ("edit", {"steps": "1001"}, "steps must be in 1..1000"),
    ("edit", {"segments": "65"}, "segments is 65; it must be in 1..64"),
]
KINDS = {"run": (Request, AnimationForm, "/v1/animations"), "edit": (EditRequest, EditForm, "/v1/edits")}
SMALL = {"frames": "2", "steps": "1"}  # every case's base: the demo model, two frames, one step


def fields_of(kind: str, fields: dict) -> dict:
    return {"prompt": "the camera pans left", **SMALL, **fields}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The image and a 9-frame clip (enough for every accepted edit case), as files and as bytes."""
    from cinemo_rt.demo_data import photo, render_clip
    from cinemo_rt.video import write_video

    folder = tmp_path_factory.mktemp("vocabulary")
    clip = folder / "clip.gif"
    write_video(render_clip(photo("chelsea"), "pan_left", 0.5, 9, 32, np.random.default_rng(0)), clip, fps=8,
                format="gif")
    image = io.BytesIO()
    Image.open(EXAMPLE_IMAGE).convert("RGB").save(image, "PNG")
    return {"image": str(EXAMPLE_IMAGE), "clip": str(clip), "image_bytes": image.getvalue(),
            "clip_bytes": clip.read_bytes(), "out": folder / "out.mp4"}


class HeldRunner:
    """The demo's runner, its UNet steps held until the test ends: accepted jobs queue, nothing runs."""

    def __init__(self, runner):
        self.runner, self.gate = runner, threading.Event()

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def step(self, group):
        self.gate.wait(60)
        self.runner.step(group)

    def edit(self, *args, **kwargs):
        self.gate.wait(60)
        return self.runner.edit(*args, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    held = HeldRunner(Runner.open())
    settings_ = ServeSettings(jobs_dir=tmp_path_factory.mktemp("jobs"), max_queue=1000,
                              policy=BatchPolicy(max_batch=1, max_wait_ms=0))
    with TestClient(create_app(settings_, open_runner=lambda: held)) as client:
        yield client
        held.gate.set()


def cli_outcome(kind: str, fields: dict, files, monkeypatch, caplog, capsys) -> str | None:
    """`cinemo-rt run|edit` through its validation phase -> None (accepted) or its one error message (logged,
    or argparse's for text that is no value of the field's type)."""
    argv = [kind, "--image", files["image"], "--out", str(files["out"]), "--overwrite"]
    if kind == "edit":
        argv += ["--video", files["clip"]]
    for name, value in fields.items():
        is_flag = field_types(KINDS[kind][0]).get(name) is bool
        argv += [f"--{name.replace('_', '-')}"] + ([] if is_flag else [value])
    monkeypatch.setattr(cli, "_execute", lambda *args, **kwargs: cli.EXIT_OK)  # the model is not run
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="cinemo_rt"):
        try:
            code = cli.main(argv)
        except SystemExit as exit_info:  # argparse: the field's decoder refused the text
            assert exit_info.code == cli.EXIT_BAD_INPUT
            return capsys.readouterr().err.strip().splitlines()[-1]
    if code == cli.EXIT_OK:
        return None
    assert code == cli.EXIT_BAD_INPUT
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    return errors[0]


def http_outcome(kind: str, fields: dict, files, server) -> str | None:
    _, _, path = KINDS[kind]
    upload = {"image": ("photo.png", files["image_bytes"], "image/png")}
    if kind == "edit":
        upload["video"] = ("clip.gif", files["clip_bytes"], "image/gif")
    response = server.post(path, data=fields, files=upload)
    if response.status_code == 202:
        server.delete(response.json()["urls"]["status"])
        return None
    assert response.status_code == 422, response.text
    return str(response.json()["detail"])


@pytest.mark.parametrize("kind, fields, words", CASES,
                         ids=[f"{k}-{'-'.join(f'{n}={v[:8]}' for n, v in f.items()) or 'defaults'}"
                              for k, f, _ in CASES])
def test_cli_and_server_refuse_the_same_values_with_the_same_message(kind, fields, words, files, server,
                                                                      monkeypatch, caplog, capsys):
    fields = fields_of(kind, fields)
    from_cli = cli_outcome(kind, fields, files, monkeypatch, caplog, capsys)
    from_http = http_outcome(kind, fields, files, server)
    if words is ACCEPTED:
        assert from_cli is None and from_http is None, (from_cli, from_http)
    else:
        assert from_cli is not None and words in from_cli, from_cli
        assert from_http is not None and words in from_http, from_http


def test_the_python_keywords_refuse_an_unknown_field_by_name():
    from cinemo_rt.errors import InputError
    from cinemo_rt.pipeline import Animator

    animator = Animator.from_checkpoint(device="cpu")
    with pytest.raises(InputError, match="unknown field 'bukket' for Request; did you mean 'bucket'"):
        animator(EXAMPLE_IMAGE, "pan left", bukket=3)
    with pytest.raises(InputError, match="unknown field 'sampler' for EditRequest"):
        animator.edit(np.zeros((9, 32, 32, 3), np.uint8), None, "pan left", sampler="ddim")


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_is_a_flag_and_a_form_field(kind):
    """The vocabulary is written once: each request field is a CLI flag and a form field of the same name."""
    request_kind, form, _ = KINDS[kind]
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[kind]
    destinations = {action.dest for action in sub._actions}
    names = {item.name for item in dataclasses.fields(request_kind)}
    assert names <= destinations
    assert names <= set(form.model_fields)


VALUE_TEXTS = st.one_of(st.integers(-3, 1100).map(str), st.sampled_from(
    ["0", "1", "8", "16", "0.5", "1.5", "-0.0", "nan", "inf", "-inf", "1e400", "auto", "ddim", "dpmpp-2m", "x",
     "true", "false", "yes", " 7 ", str(SEED_MAX), str(SEED_MAX - 1), "9" * 25]), st.text(max_size=6))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(sorted(KINDS)), data=st.data())
def test_the_form_and_the_flags_build_the_same_request_from_any_text(kind, data):
    """Any text in any fields: the form's path (its model, decoded by `request.parse_text`, then
    `build_request`) and the CLI's (its flags, decoded by the same function, then the request) refuse
    together, or build the same request."""
    request_kind, form, _ = KINDS[kind]
    names = sorted(item.name for item in dataclasses.fields(request_kind)
                   if field_types(request_kind)[item.name] is not bool)  # bool fields are flags without text
    chosen = data.draw(st.lists(st.sampled_from(names), max_size=4, unique=True))
    fields = {"prompt": "pan left", **{name: data.draw(VALUE_TEXTS, label=name) for name in chosen}}
    fields = {name: value for name, value in fields.items() if "\x00" not in value}  # no NUL in an argv
    defaults = Size(32, 32, 8)

    def via_form():
        try:
            values, _ = split_form(form.model_validate(fields))
            return build_request(request_kind, values, defaults)
        except (ValueError, RequestError):  # pydantic's ValidationError is a ValueError
            return None

    def via_flags():
        argv = [kind, "--image", "i.png"] + (["--video", "v.mp4"] if kind == "edit" else [])
        argv += [part for name, value in fields.items() for part in (f"--{name.replace('_', '-')}={value}",)]
        try:
            return cli.build_request(cli.parse_args(argv), request_kind).resolve(defaults)
        except (SystemExit, ValueError):
            return None

    from_form, from_flags = via_form(), via_flags()
    assert (from_form is None) == (from_flags is None), (fields, from_form, from_flags)
    if from_form is not None:
        assert dataclasses.replace(from_form, seed=0) == dataclasses.replace(from_flags, seed=0)
