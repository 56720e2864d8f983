"""TensorRT. CPU tier: the exported graphs use only operators TensorRT's ONNX parser supports
(export/trt_onnx_ops.json, with its source) and pass ONNX / Polygraphy checks; profile selection, cache keys
and manifest validation of the backend, with no engine faked. GPU tier (skipped without tensorrt and CUDA):
build engines for the tiny checkpoint, compare each with PyTorch at the fp16 tolerance of
cinemo_rt/parity.py, and run a whole video through Animator.from_engines(..., backend="tensorrt")."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from cinemo_rt import manifest as mf
from cinemo_rt.backends import tensorrt_backend as tb
from cinemo_rt.backends.base import Port

OPS_FILE = Path(__file__).resolve().parents[1] / "export" / "trt_onnx_ops.json"
TRT_SKIP = ("needs the tensorrt Python package and a CUDA GPU; run `pytest tests/test_tensorrt.py` on a GPU "
            "machine with TensorRT 10")


def _tensorrt_runs() -> bool:
    """Importing, not finding: PyPI's `tensorrt` stub and a broken CUDA install are found but do not import."""
    if not torch.cuda.is_available():
        return False
    try:
        import tensorrt  # noqa: F401
    except Exception:  # ImportError, or the stub's RuntimeError, or a missing libnvinfer
        return False
    return True


HAVE_TRT = _tensorrt_runs()
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason=TRT_SKIP)
TINY = dict(height=64, width=64, frames=15)


# ---------------------------------------------------------------------------------------------
# Operator coverage and ONNX checks of the exported tiny graphs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_graphs(engines_fp32):
    """The fp32 graphs of the tiny checkpoint, as the build flow exported and cleaned them."""
    manifest = mf.Manifest.read(engines_fp32)
    return {name: manifest.onnx_path(engines_fp32, name) for name in manifest.components}


def _ops_table():
    return json.loads(OPS_FILE.read_text())


def test_ops_table_records_its_source():
    table = _ops_table()
    assert "onnx/onnx-tensorrt" in table["source"]["url"] and "operators.md" in table["source"]["url"]
    assert table["tensorrt_version"].startswith("10.") and table["target_min_version"] == "10.0"
    assert table["operators"]["Conv"]["supported"] and not table["operators"]["NonMaxSuppression"].get("since")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


@pytest.mark.slow
def test_exported_ops_are_supported_by_tensorrt(tiny_graphs):
    import onnx

    table = _ops_table()
    target = _version(table["target_min_version"])
    lo, hi = table["opset_range"][table["target_min_version"]]
    problems = []
    for name, path in tiny_graphs.items():
        model = onnx.load(str(path), load_external_data=False)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        if not lo <= opset <= hi:
            problems.append(f"{name}: opset {opset} outside TensorRT {table['target_min_version']}'s {lo}..{hi}")
        for op in sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}):
            entry = table["operators"].get(op)
            if entry is None or not entry["supported"]:
                problems.append(f"{name}: {op} is not supported by TensorRT's ONNX parser")
            elif _version(entry.get("since", "10.0")) > target:
                problems.append(f"{name}: {op} needs TensorRT {entry['since']}")
        custom = {n.domain for n in model.graph.node} - {"", "ai.onnx"}
        if custom:
            problems.append(f"{name}: custom-domain nodes {sorted(custom)} need plugins")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_exported_graphs_pass_onnx_and_polygraphy_checks(tiny_graphs):
    import onnx
    pytest.importorskip("polygraphy")
    from polygraphy.backend.onnx import onnx_from_path
    from polygraphy.backend.onnx.util import get_input_metadata, get_output_metadata

    from export.specs import SPECS

    for name, path in tiny_graphs.items():
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx_from_path(str(path))
        inputs, outputs = get_input_metadata(model.graph), get_output_metadata(model.graph)
        assert list(inputs.keys()) == list(SPECS[name].inputs), name
        assert list(outputs.keys()) == list(SPECS[name].outputs), name


# ---------------------------------------------------------------------------------------------
# Profiles (pure Python)
# ---------------------------------------------------------------------------------------------
STATIC2 = {"x": ((2, 4, 8), (2, 4, 8), (2, 4, 8))}
STATIC1 = {"x": ((1, 4, 8), (1, 4, 8), (1, 4, 8))}
DYNAMIC = {"x": ((1, 4, 8), (2, 4, 8), (4, 4, 8))}


def test_select_profile_prefers_exact_opt_then_containing():
    assert tb.select_profile([STATIC2, STATIC1], {"x": (1, 4, 8)}) == 1
    assert tb.select_profile([DYNAMIC, STATIC2], {"x": (2, 4, 8)}) == 0
    assert tb.select_profile([STATIC1, DYNAMIC], {"x": (3, 4, 8)}) == 1
    with pytest.raises(tb.ShapeError, match="outside every optimisation profile"):
        tb.select_profile([STATIC2], {"x": (2, 4, 16)})
    with pytest.raises(tb.ShapeError):
        tb.select_profile([STATIC2], {"x": (2, 4)})  # rank differs


def test_profiles_from_the_export_spec():
    from export.specs import SPECS, Dims
    from export.tensorrt_build import check_profiles_against_graph, profiles_for

    dims = Dims()  # 15 generated frames (16 in the video) x 320 x 512
    unet = profiles_for(SPECS["unet"], dims)
    assert len(unet) == 1 and tb.profile_is_static(unet[0])
    assert unet[0]["x_t"][1] == (2, 4, 15, 40, 64)  # CFG batch, 15 generated frames, latent 40 x 64
    decoder = profiles_for(SPECS["vae_decoder"], dims)
    assert [p["latents"][1][0] for p in decoder] == [14, 2]  # the reference's chunks
    dynamic = profiles_for(SPECS["unet"], dims, dynamic=True)[0]
    assert dynamic["x_t"][0][0] == 1 and dynamic["x_t"][2][0] == 2 and not tb.profile_is_static(dynamic)
    graph = {"x_t": ("batch", 4, 15, 40, 64), "t": (-1,), "text": (-1, 77, 768), "z1": (-1, 4, 1, 40, 64),
             "motion_id": (-1,)}
    assert check_profiles_against_graph(graph, unet) == []
    assert any("fixes it at 40" in p for p in
               check_profiles_against_graph({**graph, "x_t": (-1, 4, 15, 40, 40)}, unet))
    assert any("no shapes" in p for p in check_profiles_against_graph({**graph, "extra": (1,)}, unet))


# ---------------------------------------------------------------------------------------------
# Keys and the one manifest (pure Python)
# ---------------------------------------------------------------------------------------------
H100 = mf.Platform("10.7.0", "NVIDIA H100 80GB HBM3", "9.0")


def _entry(folder: Path, component="unet", platform=H100, onnx="a" * 64, payload=b"engine-bytes") -> mf.EngineEntry:
    from cinemo_rt.files import file_sha256
    from export.tensorrt_build import BuildOptions, engine_file_name, engine_key, write_atomic

    key = engine_key(component, onnx, platform, [STATIC2], BuildOptions())
    path = folder / mf.ENGINE_SUBDIR / engine_file_name(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, payload)
    return mf.EngineEntry(key=key, file=path.name, engine_sha256=file_sha256(path), engine_bytes=len(payload),
                          inputs={"x": "float16"}, outputs={"y": "float16"})


def _manifest_with(engines, onnx_sha256="a" * 64) -> mf.Manifest:
    manifest = mf.Manifest(components={"unet": mf.Component("k", "w", mf.OnnxArtifact("unet.onnx", onnx_sha256))})
    for entry in engines:
        manifest.upsert_engine(entry)
    return manifest


def test_key_digest_changes_with_everything_it_depends_on(tmp_path):
    from export.tensorrt_build import BuildOptions, engine_key

    base = engine_key("unet", "a" * 64, H100, [STATIC2], BuildOptions())
    variants = [engine_key("unet", "b" * 64, H100, [STATIC2], BuildOptions()),
                engine_key("unet", "a" * 64, mf.Platform("10.8.0", H100.gpu_name, "9.0"), [STATIC2], BuildOptions()),
                engine_key("unet", "a" * 64, mf.Platform("10.7.0", "NVIDIA A100", "8.0"), [STATIC2], BuildOptions()),
                engine_key("unet", "a" * 64, H100, [DYNAMIC], BuildOptions()),
                engine_key("unet", "a" * 64, H100, [STATIC2], BuildOptions(precision="fp16-flags")),
                engine_key("unet", "a" * 64, H100, [STATIC2], BuildOptions(refit=True)),
                engine_key("unet", "a" * 64, H100, [STATIC2], BuildOptions(optimization_level=5)),
                engine_key("unet", "a" * 64, H100, [STATIC2], BuildOptions(workspace_bytes=4 << 30))]
    digests = {base.digest()} | {v.digest() for v in variants}
    assert len(digests) == 1 + len(variants)


def test_manifest_roundtrip_and_selection(tmp_path):
    unet = _entry(tmp_path)
    a100 = _entry(tmp_path, platform=mf.Platform("10.7.0", "NVIDIA A100-SXM4-80GB", "8.0"), payload=b"other")
    manifest = _manifest_with([unet, a100])
    assert manifest.upsert_engine(_entry(tmp_path, onnx="b" * 64)) == [unet]  # same GPU: replaced
    manifest.upsert_engine(unet)
    manifest.write(tmp_path)
    read = mf.Manifest.read(tmp_path)
    assert read == manifest and [e.key for e in read.engines] == [a100.key, unet.key]
    chosen, problems = read.select_engines(H100, ["unet"])
    assert chosen["unet"] == unet and problems == []
    mf.verify_engine_file(tmp_path, chosen["unet"])


def test_mismatches_are_explained(tmp_path):
    manifest = _manifest_with([_entry(tmp_path)])
    _, problems = manifest.select_engines(mf.Platform("10.8.0", "NVIDIA L4", "8.9"), ["unet", "vae_decoder"])
    text = " ".join(problems)
    assert "TensorRT 10.7.0 != installed 10.8.0" in text and "compute capability 9.0" in text
    assert "no TensorRT engine for 'vae_decoder'" in text
    _, problems = _manifest_with([_entry(tmp_path)], onnx_sha256="c" * 64).select_engines(H100, ["unet"])
    assert "ONNX graph changed" in problems[0]


def test_corrupt_or_edited_engines_are_detected_with_a_rebuild_hint(tmp_path):
    entry = _entry(tmp_path)
    path = _manifest_with([entry]).write(tmp_path)
    engine = tmp_path / mf.ENGINE_SUBDIR / entry.file
    engine.write_bytes(b"engine-bytez")  # same size, other bytes
    with pytest.raises(mf.EngineMismatchError, match="SHA-256.*export.build_engines"):
        mf.verify_engine_file(tmp_path, entry)
    engine.write_bytes(b"short")
    with pytest.raises(mf.EngineMismatchError, match="truncated"):
        mf.verify_engine_file(tmp_path, entry)
    engine.unlink()
    with pytest.raises(mf.EngineMismatchError, match="missing"):
        mf.verify_engine_file(tmp_path, entry)
    data = json.loads(path.read_text())
    data["engines"][0]["key"]["gpu_name"] = "NVIDIA H200"  # hand-edited key: digest no longer matches
    path.write_text(json.dumps(data))
    with pytest.raises(mf.EngineMismatchError, match="edited"):
        mf.Manifest.read(tmp_path)
    data["engines"][0]["file"] = "../../elsewhere.plan"
    data["engines"][0]["key"]["gpu_name"] = H100.gpu_name
    path.write_text(json.dumps(data))
    with pytest.raises(mf.EnginesDirError, match="outside the engines folder"):
        mf.verify_engine_file(tmp_path, mf.Manifest.read(tmp_path).engines[0])
    path.write_text("{not json")
    with pytest.raises(mf.EnginesDirError, match="not valid JSON"):
        mf.Manifest.read(tmp_path)


def test_dtype_names():
    assert tb.torch_dtype_of(type("D", (), {"name": "HALF"})()) is torch.float16
    assert tb.torch_dtype_of("DataType.INT64") is torch.int64
    with pytest.raises(mf.EngineMismatchError):
        tb.torch_dtype_of("DataType.FP8")


def test_timing_cache_is_per_gpu_model(tmp_path):
    from export.tensorrt_build import timing_cache_path

    h200 = mf.Platform("10.7.0", "NVIDIA H200", "9.0")
    assert timing_cache_path(tmp_path, H100) != timing_cache_path(tmp_path, h200)  # both sm_90
    assert timing_cache_path(tmp_path, H100).name == "timing-trt10.7.0-NVIDIA_H100_80GB_HBM3-sm9.0.cache"


# ---------------------------------------------------------------------------------------------
# Code paths that need the tensorrt module, run against a fake one (the real bindings' names)
# ---------------------------------------------------------------------------------------------
class FakeStream:
    """Records `wait_stream` calls in a shared log; `cuda_stream` is the handle TensorRT is given."""

    def __init__(self, name, handle, log):
        self.name, self.cuda_stream, self.log = name, handle, log

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))


class FakeContext:
    def __init__(self, log):
        self.log, self.shapes = log, {}

    def set_optimization_profile_async(self, index, stream):
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, address):
        pass

    def get_tensor_shape(self, name):
        return self.shapes["x"]

    def execute_async_v3(self, stream_handle):
        self.log.append(("enqueue", stream_handle))
        return True


def fake_tensorrt(log, version="10.7.0", compute_precision=True):
    mode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    half = types.SimpleNamespace(name="HALF")

    class Engine:
        num_io_tensors, num_optimization_profiles = 2, 1

        def get_tensor_name(self, i):
            return ("x", "y")[i]

        def get_tensor_mode(self, name):
            return mode.INPUT if name == "x" else mode.OUTPUT

        def get_tensor_dtype(self, name):
            return half

        def get_tensor_shape(self, name):
            return (-1, 4, 8)

        def create_execution_context(self, strategy):
            return FakeContext(log)

    class ILayer:
        def __init__(self, kind):
            self.type = kind

    normalization = type("INormalizationLayer", (ILayer,), {"compute_precision": None} if compute_precision else {})
    network = types.SimpleNamespace(num_layers=2, layers=[ILayer("NORMALIZATION"), ILayer("CONVOLUTION")])
    network.get_layer = lambda i: network.layers[i]
    return types.SimpleNamespace(
        __version__=version, TensorIOMode=mode, ExecutionContextAllocationStrategy=types.SimpleNamespace(
            USER_MANAGED="USER_MANAGED"), LayerType=types.SimpleNamespace(NORMALIZATION="NORMALIZATION"),
        INormalizationLayer=normalization, float32="float32", network=network,
        runtime=types.SimpleNamespace(deserialize_cuda_engine=lambda data: Engine()))


def test_engines_run_on_their_own_stream_ordered_by_events(tmp_path, monkeypatch):
    """execute_async_v3 gets the runner's stream, never the caller's (or the legacy default, handle 0), and the
    two streams are ordered both ways around the enqueue."""
    log = []
    trt = fake_tensorrt(log)
    entry = _entry(tmp_path)
    caller, own = FakeStream("caller", 0, log), FakeStream("tensorrt", 0x7E57, log)
    monkeypatch.setattr(tb.torch.cuda, "current_stream", lambda device=None: caller)
    runner = tb.EngineRunner(trt, trt.runtime, mf.verify_engine_file(tmp_path, entry), entry,
                             torch.device("cpu"), tmp_path, stream=own)
    assert runner.inputs == (Port("x", torch.float16, (-1, 4, 8)),)
    (out,) = runner({"x": torch.ones(2, 4, 8)})
    assert out.shape == (2, 4, 8) and out.dtype == torch.float16
    assert log == [("wait", "tensorrt", "caller"), ("enqueue", 0x7E57), ("wait", "caller", "tensorrt")]


@pytest.mark.parametrize("has_compute_precision", [True, False])
def test_normalization_compute_precision_is_guarded(has_compute_precision, caplog):
    """TensorRT 10 sets INormalizationLayer.compute_precision; 11 removed it: the build goes on with a warning."""
    from export.tensorrt_build import _normalization_compute_fp32

    trt = fake_tensorrt([], version="11.0.0" if not has_compute_precision else "10.7.0",
                        compute_precision=has_compute_precision)
    count = _normalization_compute_fp32(trt, trt.network)
    if has_compute_precision:
        assert count == 1 and trt.network.layers[0].compute_precision == "float32"
    else:
        assert count == 0 and "compute_precision" in caplog.text


def fake_builder(calls, version="10.7.0"):
    """fake_tensorrt plus the builder side: a network with input x (-1, 4, 8) and output y, a config that records
    what it is told, and a build that returns fixed bytes."""
    trt = fake_tensorrt([], version=version)
    half = types.SimpleNamespace(name="HALF")
    net = trt.network
    net.num_inputs = net.num_outputs = 1
    net.get_input = lambda i: types.SimpleNamespace(name="x", shape=(-1, 4, 8), dtype=half)
    net.get_output = lambda i: types.SimpleNamespace(name="y", shape=(-1, 4, 8), dtype=half)

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def __setattr__(self, name, value):
            calls.append((name, value))

        def add_optimization_profile(self, profile):
            calls.append(("profile", profile.shapes))

        def create_timing_cache(self, data):
            return types.SimpleNamespace(serialize=lambda: b"timing-cache")

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return net

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build",))
            return b"plan-bytes"

    parser = types.SimpleNamespace(set_flag=lambda flag: None, parse_from_file=lambda path: True)
    trt.Logger = type("Logger", (), {"WARNING": "WARNING", "__init__": lambda self, level: None})
    trt.Builder, trt.OnnxParser = Builder, lambda network, logger: parser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.OnnxParserFlag = types.SimpleNamespace(NATIVE_INSTANCENORM="NATIVE_INSTANCENORM")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", REFIT="REFIT", TF32="TF32",
                                            OBEY_PRECISION_CONSTRAINTS="OBEY_PRECISION_CONSTRAINTS")
    return trt


def test_build_keys_engines_on_optimisation_level_and_workspace(tmp_path, monkeypatch):
    """build_engine against a fake TensorRT: the config gets the workspace and optimisation level, the key records
    them, an unchanged key is not rebuilt, a changed level is (and replaces the old engine in the manifest), and
    the timing cache is named by the GPU."""
    import sys

    from export import tensorrt_build as build

    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_builder(calls))
    monkeypatch.setattr(build, "_platform", lambda device_index=0: H100)
    onnx = tmp_path / "unet.onnx"
    onnx.write_bytes(b"graph")
    options = build.BuildOptions(workspace_bytes=1 << 30, optimization_level=4)
    manifest = mf.Manifest()
    entry = build.build_engine("unet", onnx, tmp_path, [DYNAMIC], options)
    manifest.upsert_engine(entry)
    assert entry.key.workspace_bytes == 1 << 30 and entry.key.optimization_level == 4
    assert ("workspace", 1 << 30) in calls and ("builder_optimization_level", 4) in calls
    assert ("profile", DYNAMIC) in calls and calls.count(("build",)) == 1
    assert build.timing_cache_path(tmp_path, H100).read_bytes() == b"timing-cache"
    assert mf.verify_engine_file(tmp_path, entry).read_bytes() == b"plan-bytes"
    assert build.build_engine("unet", onnx, tmp_path, [DYNAMIC], options, existing=manifest.engines) == entry
    assert calls.count(("build",)) == 1  # up to date
    other = build.build_engine("unet", onnx, tmp_path, [DYNAMIC], build.BuildOptions(workspace_bytes=1 << 30),
                               existing=manifest.engines)
    assert calls.count(("build",)) == 2 and other.key.digest() != entry.key.digest()
    assert manifest.upsert_engine(other) == [entry]  # replaced for this GPU: its file can go
    assert [e.key for e in manifest.engines] == [other.key]


def test_unavailable_reason_names_a_missing_engines_manifest(tmp_path, monkeypatch):
    """An engines folder without manifest.json: a reason (EnginesDirError), not a traceback."""
    _entry(tmp_path)  # an engine file, but no manifest recording it
    monkeypatch.setattr(tb.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tb, "_import_tensorrt", lambda: fake_tensorrt([]))
    monkeypatch.setattr(tb, "current_platform", lambda device: H100)
    reason = tb.tensorrt_unavailable_reason(tmp_path, torch.device("cuda", 0))
    assert "manifest.json" in reason and "export.build_engines" in reason


def test_unavailable_reason_without_a_gpu(tmp_path):
    assert "CUDA devices only" in tb.tensorrt_unavailable_reason(tmp_path, torch.device("cpu"))
    if not torch.cuda.is_available():
        assert tb.tensorrt_unavailable_reason(tmp_path, torch.device("cuda")) == "no CUDA GPU is available"


# ---------------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_engines(tiny_checkpoint_dir, tmp_path_factory):
    """fp16 graphs of the tiny checkpoint and one engine per component (static tiny profiles), built by the
    build flow, which also checks every engine against PyTorch (the manifest records the numbers)."""
    from conftest import build_tiny_engines

    if not HAVE_TRT:
        pytest.skip(TRT_SKIP)
    out = tmp_path_factory.mktemp("engines")
    manifest = build_tiny_engines(tiny_checkpoint_dir, out, "fp16", targets=("onnx", "tensorrt"))
    return out, manifest


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt
def test_build_flow_verified_every_engine(tiny_engines):
    from cinemo_rt.parity import TOLERANCES

    folder, manifest = tiny_engines
    assert {e.component for e in manifest.engines} == set(manifest.components)
    for name, component in manifest.components.items():
        record = component.parity["tensorrt"]
        assert record["ok"], name
        assert max(o["relative_l2"] for o in record["outputs"]) <= TOLERANCES["fp16"].relative_l2


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("component", ["text_encoder", "vae_encoder", "unet", "vae_decoder"])
def test_engine_matches_pytorch(tiny_engines, tiny_checkpoint_dir, component):
    from cinemo_rt.checkpoint import load_checkpoint
    from cinemo_rt.parity import TOLERANCES, relative_error
    from export.specs import SPECS, dims_for
    from export.tensorrt_build import engine_runner

    folder, manifest = tiny_engines
    checkpoint = load_checkpoint(tiny_checkpoint_dir, device="cpu", dtype=torch.float32)
    dims = dims_for(checkpoint, **TINY)
    spec = SPECS[component]
    entry = next(e for e in manifest.engines if e.component == component)
    runner = engine_runner(folder, manifest, entry)
    for profile in entry.profiles:
        batch = next(iter(profile.values()))[1][0]
        feeds = spec.sample_inputs(dims, "fp32", batch=batch, seed=1)
        with torch.no_grad():
            reference = spec.module_fn(checkpoint).float()(*feeds.values())
        reference = reference if isinstance(reference, tuple) else (reference,)
        out = runner({n: t.cuda() for n, t in feeds.items()})
        for name, got, ref in zip(spec.outputs, out, reference):
            err = relative_error(got.float().cpu(), ref)
            assert err <= TOLERANCES["fp16"].relative_l2, f"{component}.{name} batch {batch}: {err:.2e}"


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt
def test_whole_video_through_tensorrt(tiny_engines, tiny_checkpoint_dir):
    from cinemo_rt.parity import TOLERANCES, relative_error
    from cinemo_rt.pipeline import Animator

    folder, _ = tiny_engines
    image = torch.rand(64, 64, 3).mul(255).to(torch.uint8).numpy()
    trt_animator = Animator.from_engines(folder, backend="tensorrt", device="cuda")
    assert trt_animator.backend.name == "tensorrt"
    options = dict(steps=4, seed=0, height=64, width=64, frames=15)
    video = trt_animator(image, "the camera zooms in", 9, **options)
    reference = Animator.from_checkpoint(tiny_checkpoint_dir, device="cuda", dtype="fp32")(
        image, "the camera zooms in", 9, **options)
    assert video.shape == reference.shape == (16, 64, 64, 3)
    # uint8 frames after 4 fp16 steps: the fp16 tolerance on the frames as a whole.
    assert relative_error(video, reference) <= 5 * TOLERANCES["fp16"].relative_l2
