"""Property-based hostile input (docs/RELIABILITY.md, "Tests that find the next ones").

- The HTTP API fuzzed from its own OpenAPI schema (schemathesis): every generated request, valid or not,
  gets a 2xx/4xx answer, never a 5xx, and nothing logs a traceback. The app runs with `IdleExecutor` (jobs
  are stored and queued, the model never runs) so the fuzzer exercises validation, storage and auth.
- The request types and config loaders under hypothesis-generated values (non-finite, huge, wrong types):
  each either builds or raises the one error type its entry point turns into a message (ValueError).

Bounded run time: `FUZZ_EXAMPLES` examples per operation, a fixed count per property; 31 s for the whole file
on a shared 2-core machine beside other test runs.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ_EXAMPLES = 40
ANY_NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70))
ANY_JSON = st.recursive(st.one_of(st.none(), st.booleans(), ANY_NUMBER, st.text(max_size=20)),
                        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)


# ---------------------------------------------------------------------------------------------
# The HTTP API from its OpenAPI schema
# ---------------------------------------------------------------------------------------------
schemathesis = pytest.importorskip("schemathesis", reason="dev extras: pip install -e '.[dev]'")
pytest.importorskip("fastapi", reason="serving extras: pip install -e '.[serve]'")


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory):
    from test_hostile_server import IdleExecutor

    from cinemo_rt.serve.app import ServeSettings, create_app

    app = create_app(ServeSettings(jobs_dir=tmp_path_factory.mktemp("fuzz") / "jobs"),
                     executor_factory=IdleExecutor)
    app.state.start()  # the lifespan's start (idempotent); schemathesis calls the app without a lifespan
    yield app
    app.state.stop()


def test_the_api_never_answers_5xx_nor_logs_a_traceback(fuzzed_app, caplog):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/animations", "/v1/edits", "/v1/animations/{job_id}"}
    from test_hostile_server import gif_bytes, png_bytes

    uploads = {"/v1/animations": {"image": png_bytes()}, "/v1/edits": {"video": gif_bytes(frames=24), "image": png_bytes()}}
    failures, answers = [], {}
    for operation in operations:
        strategy = operation.as_strategy()

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case):
            bodies = [case.body]
            if isinstance(case.body, dict) and operation.path in uploads:  # again with a valid file, to get past
                bodies.append({**case.body, **uploads[operation.path]})  # decoding to validation and storage
            for body in bodies:
                case.body = body
                response = case.call()
                answers.setdefault(f"{case.method} {operation.path}", set()).add(response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path}: {response.status_code} "
                                    f"{response.text[:200]}")

        with caplog.at_level(logging.WARNING):
            check()
    assert not failures, "\n".join(failures[:10])
    print({op: sorted(codes) for op, codes in answers.items()})
    assert len(answers) == len(operations)
    assert {202, 422} <= answers["POST /v1/animations"], answers  # the fuzzer got jobs in, and got refused
    assert 422 in answers["POST /v1/edits"], answers  # (random edit fields rarely fit a 24-frame clip)
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, tracebacks[0].getMessage()


# ---------------------------------------------------------------------------------------------
# Request types
# ---------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(motion=ANY_NUMBER, guidance=ANY_NUMBER, eta=ANY_NUMBER, cache=ANY_NUMBER, until=ANY_NUMBER,
       steps=st.integers(-5, 2**40), frames=st.one_of(st.none(), st.integers(-5, 2**40)),
       prompt=st.text(max_size=30))
def test_request_builds_or_says_why(motion, guidance, eta, cache, until, steps, frames, prompt):
    from cinemo_rt.request import Request

    try:
        request = Request(prompt=prompt, motion_id=motion, guidance=guidance, eta=eta, steps=steps, frames=frames,
                          cache=cache, guidance_until=until)
    except ValueError as err:
        assert str(err)
        return
    assert all(math.isfinite(v) for v in (request.motion_id, request.guidance, request.eta))
    assert math.isfinite(request.fewer_calls.cache) and 0 <= request.fewer_calls.guidance_until <= 1


@settings(max_examples=200, deadline=None)
@given(height=st.integers(-10, 2**40), width=st.integers(-10, 2**40), frames=st.integers(-10, 2**40),
       segments=st.integers(-10, 2**40), motion=ANY_NUMBER, start=ANY_NUMBER, seed=st.integers(-5, 2**80))
def test_server_request_checks_never_raise_anything_but_a_4xx(height, width, frames, segments, motion, start,
                                                               seed):
    from cinemo_rt.defaults import DEMO_CHECKPOINT
    from cinemo_rt.request import EditRequest, Request
    from cinemo_rt.serve.limits import RequestError, build_request, job_sizer
    from cinemo_rt.settings import Size

    sizing = job_sizer(str(DEMO_CHECKPOINT), None, None, "cpu")
    common = dict(prompt="x", motion_id=motion, height=height, width=width, frames=frames, segments=segments,
                  seed=seed)
    for kind, fields in ((Request, common), (EditRequest, {**common, "start": start})):
        try:
            build_request(kind, fields, Size(32, 32, 8), sizing)
        except RequestError as err:
            assert 400 <= err.status < 500 and str(err)


@settings(max_examples=200, deadline=None)
@given(count=st.integers(-5, 2**62), fps=st.one_of(st.none(), ANY_NUMBER.filter(lambda v: v != 0)),
       stride=st.one_of(st.none(), st.integers(-5, 2**62)), start=ANY_NUMBER, available=st.integers(0, 10**6))
def test_clip_windows_plan_or_say_why(count, fps, stride, start, available):
    from cinemo_rt.clip import plan_window

    try:
        window = plan_window(available, fps, max(count, 1), stride, start)
    except ValueError as err:
        assert str(err)
        return
    assert 0 <= window.first and window.last < available


# ---------------------------------------------------------------------------------------------
# Config loaders
# ---------------------------------------------------------------------------------------------
TRAIN_FIELDS = ("steps", "batch_size", "height", "width", "threads", "num_frames", "lr", "text_dropout",
                "frame_interval", "betas", "bf16", "output_dir", "unet", "seed", "ema_decay")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.dictionaries(st.sampled_from(TRAIN_FIELDS), ANY_JSON, max_size=4))
def test_training_config_builds_or_says_why(values):
    from cinemo_rt.train.config import TrainConfig

    try:
        cfg = TrainConfig(**{"unet": {"sample_size": 8}, **values})
    except ValueError as err:
        assert str(err)
        return
    assert cfg.batch_size >= 1 and cfg.height % 8 == 0 and 0 <= cfg.threads and cfg.steps >= 0


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.dictionaries(st.sampled_from(["height", "width", "frames", "step_cache"]), ANY_JSON, max_size=4),
       coefficients=st.one_of(st.none(), ANY_JSON))
def test_checkpoint_json_loaders_load_or_say_why(tmp_path_factory, data, coefficients):
    from cinemo_rt.fewer_calls import load_coefficients
    from cinemo_rt.settings import Size

    folder = tmp_path_factory.mktemp("sizes")
    if coefficients is not None:
        data["step_cache"] = {"coefficients": coefficients}
    (folder / "cinemo_rt.json").write_text(json.dumps(data))
    for load in (Size.from_folder, load_coefficients):
        try:
            loaded = load(folder)
        except ValueError as err:
            assert str(folder) in str(err)
            continue
        if isinstance(loaded, Size):
            assert min(loaded.height, loaded.width, loaded.frames) >= 1
        elif loaded is not None:
            assert all(math.isfinite(c) for c in loaded)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes=st.dictionaries(st.sampled_from(["hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "vocab_size", "max_position_embeddings",
                                                "hidden_act", "layer_norm_eps"]), ANY_JSON, min_size=1,
                               max_size=3))
def test_text_encoder_config_loads_or_says_why(tmp_path_factory, changes):
    """Wrong types, huge or non-finite values in the text encoder's config: one CheckpointError naming it, or a
    model no larger than its weights."""
    from cinemo_rt.checkpoint import _load_text_encoder
    from cinemo_rt.defaults import DEMO_CHECKPOINT

    folder = tmp_path_factory.mktemp("te")
    (folder / "text_encoder").mkdir()
    config = json.loads((DEMO_CHECKPOINT / "text_encoder" / "config.json").read_text())
    config.update(changes)
    (folder / "text_encoder" / "config.json").write_text(json.dumps(config))
    (folder / "text_encoder" / "model.safetensors").symlink_to(DEMO_CHECKPOINT / "text_encoder" / "model.safetensors")
    (folder / "tokenizer").symlink_to(DEMO_CHECKPOINT / "tokenizer")
    problems: list[str] = []
    _load_text_encoder(folder, problems)  # raises nothing: every failure is a listed problem
    assert all(p.startswith(("text_encoder", "tokenizer")) for p in problems), problems
