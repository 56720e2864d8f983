"""UNet3D: the released state-dict layout, the forward contract, and the parts checked against independent
implementations (diffusers' UNet2DConditionModel for the spatial backbone, a direct formula for the
temporal attention)."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from cinemo_rt.model import UNet3D, UNetConfig, tiny_config
from cinemo_rt.model.attention import relative_position_buckets
from cinemo_rt.parity import TOLERANCES, relative_error

DATA = Path(__file__).parent / "data"


def _inputs(batch=2, frames=5, h=8, w=8, text_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x_t=torch.randn(batch, 4, frames, h, w, generator=g),
        t=torch.randint(0, 1000, (batch,), generator=g),
        text=torch.randn(batch, 77, text_dim, generator=g),
        z1=torch.randn(batch, 4, 1, h, w, generator=g),
        motion_id=torch.rand(batch, generator=g) * 20 + 80,
    )


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet3D(tiny_config()).eval()


# -- the released layout ------------------------------------------------------------------------
def test_full_state_dict_matches_release_manifest_line_for_line():
    with torch.device("meta"):
        unet = UNet3D.from_config(DATA / "unet_config_full.json")
    manifest = [line.rstrip("\n").split("\t") for line in open(DATA / "unet_manifest_full.tsv")]
    ours = [[k, str(tuple(v.shape)), str(v.dtype).removeprefix("torch.")] for k, v in unet.state_dict().items()]
    assert len(ours) == len(manifest) == 834
    for line, (theirs, mine) in enumerate(zip(manifest, ours), start=1):
        assert mine == theirs, f"manifest line {line}"
    n_params = sum(v.numel() for v in unet.state_dict().values()) - 16 * 16  # minus the rotary buffers
    assert n_params == 911_092_740
    assert sum(p.numel() for p in unet.parameters()) == 911_092_740


def test_config_round_trip_and_released_fields():
    config = UNetConfig.from_file(DATA / "unet_config_full.json")
    assert config == UNetConfig()
    assert config.heads_per_level == (8, 8, 8, 8)
    again = UNetConfig.from_dict(config.to_dict())
    assert again == config


def test_config_per_level_heads_and_groups():
    config = dataclasses.replace(tiny_config(), attention_head_dim=[1, 2], norm_num_groups=4)
    unet = UNet3D(config)
    heads = [m.heads for name, m in unet.named_modules() if name.endswith("attn_temp")]
    assert heads[0] == 1 and 2 in heads
    assert unet.down_blocks[0].resnets[0].norm1.num_groups == 4


@pytest.mark.parametrize("field,value,needle", [
    ("use_linear_projection", True, "use_linear_projection"),
    ("attention_head_dim", (2, 2), "head size"),
    ("norm_num_groups", 5, "norm_num_groups"),
])
def test_config_errors_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        dataclasses.replace(tiny_config(), **{field: value})


def test_unknown_config_field_is_refused():
    with pytest.raises(ValueError, match="does not know"):
        UNetConfig.from_dict({**tiny_config().to_dict(), "new_option": 1})


# -- forward contract --------------------------------------------------------------------------
def test_forward_contract_shape_and_dtype(tiny_unet):
    inputs = _inputs()
    with torch.no_grad():
        eps = tiny_unet(**inputs)
    assert isinstance(eps, torch.Tensor)
    assert eps.shape == inputs["x_t"].shape and eps.dtype == torch.float32
    assert torch.isfinite(eps).all()


def test_scalar_timestep_equals_batched(tiny_unet):
    inputs = _inputs()
    with torch.no_grad():
        a = tiny_unet(**{**inputs, "t": torch.tensor(500)})
        b = tiny_unet(**{**inputs, "t": torch.tensor([500, 500])})
    assert torch.equal(a, b)


def test_deterministic(tiny_unet):
    inputs = _inputs()
    with torch.no_grad():
        assert torch.equal(tiny_unet(**inputs), tiny_unet(**inputs))


def test_every_input_matters(tiny_unet):
    inputs = _inputs(batch=1)
    with torch.no_grad():
        base = tiny_unet(**inputs)
        for name in ("x_t", "t", "text", "z1", "motion_id"):
            changed = dict(inputs)
            changed[name] = inputs[name] + (1 if name in ("t", "motion_id") else 0.5)
            assert not torch.allclose(tiny_unet(**changed), base), f"{name} has no effect"


def test_batch_elements_are_independent(tiny_unet):
    inputs = _inputs(batch=2)
    with torch.no_grad():
        both = tiny_unet(**inputs)
        first = tiny_unet(**{k: v[:1] for k, v in inputs.items()})
    assert relative_error(both[:1], first) < TOLERANCES["fp32"].relative_l2


@pytest.mark.parametrize("frames", [1, 3, 15])
def test_frame_counts(tiny_unet, frames):
    inputs = _inputs(batch=1, frames=frames)
    with torch.no_grad():
        assert tiny_unet(**inputs).shape == (1, 4, frames, 8, 8)


@pytest.mark.parametrize("h,w", [(16, 24), (9, 11), (5, 7)])
def test_resolutions_including_upsample_size_path(tiny_unet, h, w):
    inputs = _inputs(batch=1, frames=2, h=h, w=w)
    with torch.no_grad():
        assert tiny_unet(**inputs).shape == (1, 4, 2, h, w)


def test_three_levels_with_sizes_not_divisible_by_four():
    config = dataclasses.replace(
        tiny_config(), block_out_channels=(32, 32, 64), layers_per_block=1, attention_head_dim=1,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"))
    unet = UNet3D(config).eval()
    with torch.no_grad():
        assert unet(**_inputs(batch=1, frames=2, h=10, w=14)).shape == (1, 4, 2, 10, 14)


def test_bf16_on_cpu_close_to_fp32(tiny_unet):
    inputs = _inputs(batch=1, frames=3)
    half = UNet3D(tiny_unet.config)
    half.load_state_dict(tiny_unet.state_dict())
    half = half.to(torch.bfloat16).eval()
    with torch.no_grad():
        ref = tiny_unet(**inputs)
        out = half(**inputs)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref) < TOLERANCES["bf16"].relative_l2


def test_first_frame_is_conditioning_only(tiny_unet):
    """The z1 frame passes through the network but its output is dropped: F in, F out."""
    inputs = _inputs(batch=1, frames=4)
    with torch.no_grad():
        out = tiny_unet(**inputs)
    assert out.shape[2] == 4


# -- checked against independent implementations ------------------------------------------------
def test_relative_position_bucket_row_matches_spec():
    buckets = relative_position_buckets(16)
    assert buckets[0].tolist() == [0, 17, 18, 19, 20, 21, 22, 23, 24, 24, 25, 25, 26, 26, 27, 27]
    assert buckets[15, 0].item() == 11  # n = 15 > 0: 8 + floor(ln(15/8)/ln(4)*8) = 11
    assert torch.equal(buckets.diagonal(), torch.zeros(16, dtype=buckets.dtype))


def _direct_temporal_attention(attn, x):
    """Temporal attention written from the paper/LaVie formulas, one head and one pair at a time."""
    n, f, c = x.shape
    heads, d = attn.heads, c // attn.heads
    q = attn.to_q(x).view(n, f, heads, d) * d ** -0.5
    k = attn.to_k(x).view(n, f, heads, d)
    v = attn.to_v(x).view(n, f, heads, d)

    def rotary(t):
        out = t.clone()
        for pair in range(16):
            theta = torch.arange(f, dtype=torch.float32) * 10000 ** (-2 * pair / 32)
            cos, sin = theta.cos()[None, :, None], theta.sin()[None, :, None]
            a, b = t[..., 2 * pair], t[..., 2 * pair + 1]
            out[..., 2 * pair] = a * cos - b * sin
            out[..., 2 * pair + 1] = b * cos + a * sin
        return out

    q, k = rotary(q), rotary(k)
    weight = attn.time_rel_pos_bias.relative_attention_bias.weight  # (32, heads)
    out = torch.zeros(n, f, heads, d)
    for h in range(heads):
        for i in range(f):
            bias = torch.stack([weight[_t5_bucket(i - j), h] for j in range(f)])
            scores = (q[:, i, h, None, :] * k[:, :, h, :]).sum(-1) + bias  # (n, f)
            out[:, i, h] = (scores.softmax(-1)[..., None] * v[:, :, h]).sum(1)
    return attn.to_out[0](out.reshape(n, f, c))


def _t5_bucket(n):
    bucket = 16 if n < 0 else 0
    n = abs(n)
    if n < 8:
        return bucket + n
    return bucket + min(15, 8 + int(math.log(n / 8) / math.log(4) * 8))


def test_temporal_attention_against_direct_formula(tiny_unet):
    block = tiny_unet.down_blocks[0].attentions[0].transformer_blocks[0]
    attn = block.attn_temp
    torch.nn.init.normal_(attn.time_rel_pos_bias.relative_attention_bias.weight)
    x = torch.randn(6, 16, attn.to_q.in_features)
    tables = tiny_unet.temporal_tables(16, torch.float32)
    with torch.no_grad():
        ours = attn(x, tables)
        direct = _direct_temporal_attention(attn, x)
    assert relative_error(ours, direct) < TOLERANCES["fp32"].relative_l2


def test_spatial_backbone_matches_diffusers_unet2d():
    """With identical frames and temporal/motion branches silenced, every output frame must equal
    diffusers' SD UNet2DConditionModel on z1: checks every spatial layer, key name and the time path."""
    from diffusers import UNet2DConditionModel

    config = tiny_config()
    unet = UNet3D(config).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "attn_temp.to_out" in name or name.startswith("add_embedding.linear_2"):
                p.zero_()
    ref = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=config.block_out_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=config.layers_per_block, attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups, cross_attention_dim=config.cross_attention_dim).eval()
    spatial = {k: v for k, v in unet.state_dict().items()
               if "attn_temp" not in k and "norm_temp" not in k and not k.startswith("add_embedding")}
    ref.load_state_dict(spatial, strict=True)
    inputs = _inputs(batch=2, frames=3)
    inputs["x_t"] = torch.zeros_like(inputs["x_t"])  # every frame equals z1
    with torch.no_grad():
        ours = unet(**inputs)
        theirs = ref(inputs["z1"][:, :, 0], inputs["t"], encoder_hidden_states=inputs["text"]).sample
    for frame in range(3):
        assert relative_error(ours[:, :, frame], theirs) < TOLERANCES["fp32"].relative_l2


def test_resnet_groupnorm_pools_over_frames(tiny_unet):
    """Changing one frame changes the normalisation of the others (5D GroupNorm, docs/METHOD.md, the UNet)."""
    resnet = tiny_unet.down_blocks[0].resnets[0]
    x = torch.randn(1, 32, 4, 8, 8)
    temb = torch.randn(1, tiny_unet.config.time_embed_dim)
    y = x.clone()
    y[:, :, 3] *= 10
    with torch.no_grad():
        assert not torch.allclose(resnet(x, temb)[:, :, 0], resnet(y, temb)[:, :, 0])


# -- memory layout ------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2])
def test_every_convolution_sees_contiguous_nchw(tiny_unet, batch):
    """One layout throughout (cinemo_rt/model/layout.py): a channels_last or strided input would make the
    convolution convert its weight or copy its input on every call."""
    seen = []

    def check(module, args):
        x = args[0]
        seen.append((module, tuple(x.shape), x.stride(), x.is_contiguous()))

    convs = [m for m in tiny_unet.modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [m.register_forward_pre_hook(check) for m in convs]
    try:
        with torch.no_grad():
            tiny_unet(**_inputs(batch=batch))
    finally:
        for handle in handles:
            handle.remove()
    assert {id(m) for m, *_ in seen} == {id(m) for m in convs}  # every convolution ran
    strided = [(shape, stride) for _, shape, stride, contiguous in seen if not contiguous]
    assert not strided, f"{len(strided)} of {len(seen)} convolution inputs not contiguous NCHW: {strided[:3]}"
    assert all(m.weight.is_contiguous() for m in convs)


# -- small maps: convolution as one matrix product (cinemo_rt/model/conv.py) ----------------------------------
@pytest.mark.parametrize("h,w,kernel,stride,padding", [
    (1, 1, 3, 1, 1), (2, 2, 3, 1, 1), (1, 2, 3, 1, 1), (2, 2, 3, 2, 1), (4, 4, 3, 2, 1), (3, 3, 3, 2, 0),
    (2, 1, 3, 2, 1), (2, 2, 1, 1, 0), (1, 1, 5, 1, 2), (2, 3, 2, 1, 1),
])
def test_small_map_convolution_equals_conv2d(h, w, kernel, stride, padding):
    from cinemo_rt.model.conv import Conv2d, conv2d_as_gemm

    torch.manual_seed(0)
    conv = Conv2d(6, 5, kernel, stride=stride, padding=padding).double()
    x = torch.randn(3, 6, h, w, dtype=torch.float64)
    reference = torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    for out in (conv(x), conv2d_as_gemm(x, conv.weight, None, conv.stride, conv.padding) + conv.bias[:, None, None]):
        assert out.shape == reference.shape and out.is_contiguous()
        torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)


def test_unet_at_small_latents_matches_the_conv2d_path(tiny_unet, monkeypatch):
    """4x4 and 2x2 latents give 2x2 and 1x1 maps, where the convolutions run as GEMMs."""
    from cinemo_rt.model import conv

    shapes = []
    original, limit = conv.conv2d_as_gemm, conv.GEMM_MAX_POSITIONS
    monkeypatch.setattr(conv, "conv2d_as_gemm", lambda x, *a: shapes.append(tuple(x.shape)) or original(x, *a))
    with torch.no_grad():
        for size in (4, 2):
            inputs = _inputs(h=size, w=size)
            ours = tiny_unet(**inputs)
            monkeypatch.setattr(conv, "GEMM_MAX_POSITIONS", 0)
            plain = tiny_unet(**inputs)
            monkeypatch.setattr(conv, "GEMM_MAX_POSITIONS", limit)
            assert relative_error(ours, plain) < TOLERANCES["fp32"].relative_l2
    assert {s[-2:] for s in shapes} >= {(2, 2), (1, 1)}


def test_traced_convolution_stays_a_convolution():
    from cinemo_rt.model.conv import Conv2d

    conv = Conv2d(4, 4, 3, padding=1).eval()
    with torch.no_grad():
        graph = torch.jit.trace(conv, torch.randn(2, 4, 2, 2)).inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "aten::_convolution" in kinds and "aten::im2col" not in kinds
