"""Single-device checks of the video models: shapes, masks, gradients, the
layout rules that let strategies act from outside, and parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsp.models import (
    CONFIGS,
    Attention,
    CrossAttention,
    LatteConfig,
    STDiTConfig,
    build_model,
    list_models,
    sdpa_core,
)

TINY = ["stdit-tiny", "latte-tiny"]
B, C_IN, T, H, W, L = 2, 4, 5, 6, 10, 7  # uneven on purpose: 5 frames, 3 x 5 patches


def make_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, zero_init=False)  # no zero projections: every input matters


def make_inputs(seed: int = 1, t: int = T, h: int = H, w: int = W):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C_IN, t, h, w, generator=g)
    timestep = torch.tensor([3, 500])
    y = torch.randn(B, L, 16, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False  # sample 1 has a 3-token prompt
    return x, timestep, y, mask


@pytest.mark.parametrize("name", TINY)
def test_forward_shape_and_determinism(name):
    x, timestep, y, mask = make_inputs()
    out = make_model(name)(x, timestep, y, mask)
    assert out.shape == (B, 2 * C_IN, T, H, W)
    assert torch.isfinite(out).all()
    assert torch.equal(out, make_model(name)(x, timestep, y, mask))


@pytest.mark.parametrize("name", TINY)
def test_sizes_are_read_at_run_time(name):
    model = make_model(name)
    for t, h, w in [(1, 2, 2), (3, 4, 8), (8, 10, 6)]:
        x, timestep, y, mask = make_inputs(t=t, h=h, w=w)
        assert model(x, timestep, y, mask).shape == (B, 2 * C_IN, t, h, w)


@pytest.mark.parametrize("name", TINY)
def test_backward_reaches_every_parameter(name):
    model = make_model(name)
    model(*make_inputs()).square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", TINY)
def test_masked_text_tokens_do_not_matter(name):
    model = make_model(name)
    x, timestep, y, mask = make_inputs()
    out = model(x, timestep, y, mask)
    y2 = y.clone()
    y2[1, 3:] = 100 * torch.randn_like(y2[1, 3:])  # masked-out tokens only
    torch.testing.assert_close(model(x, timestep, y2, mask), out, rtol=0, atol=0)
    y3 = y.clone()
    y3[1, 0] += 1.0  # a real token of sample 1: changes sample 1 only
    out3 = model(x, timestep, y3, mask)
    assert not torch.allclose(out3[1], out[1])
    torch.testing.assert_close(out3[0], out[0])


@pytest.mark.parametrize("name", TINY)
def test_no_mask_equals_all_true_mask(name):
    model = make_model(name)
    x, timestep, y, _ = make_inputs()
    full = torch.ones(B, L, dtype=torch.int64)  # 0/1 integer masks are accepted too
    torch.testing.assert_close(model(x, timestep, y), model(x, timestep, y, full))


def test_bad_inputs_fail_loudly():
    model = make_model("stdit-tiny")
    x, timestep, y, mask = make_inputs()
    with pytest.raises(ValueError, match="W=9"):
        model(x[..., :9], timestep, y, mask)
    mask[0] = False
    with pytest.raises(ValueError, match="at least one"):
        model(x, timestep, y, mask)
    with pytest.raises(ValueError, match="mask must be"):
        model(x, timestep, y, mask[:, :3])


# --- layout rules: a module gives the same values on any slice of a dim it does not compute over


def block_inputs(model: nn.Module, seed: int = 2):
    """Activation (B, T, S, C) and the block arguments y, t0, mask, like inside the model."""
    g = torch.Generator().manual_seed(seed)
    c = model.config.hidden_size
    x = torch.randn(B, T, 15, c, generator=g)
    _, timestep, y, mask = make_inputs()
    with torch.no_grad():
        t0 = model.t_block(model.t_embedder(timestep))
        y = model.y_embedder(y)
    return x, y, t0, mask


def call(module: nn.Module, x, y, t0, mask):
    if isinstance(module, CrossAttention):
        return module(x, y, mask)
    if hasattr(module, "scale_shift_table") and not hasattr(module, "linear"):  # a block
        return module(x, y, t0, mask)
    return module(x)


SLICES = {"T": (slice(None), slice(1, 3)), "S": (slice(None), slice(None), slice(4, 11))}
LAYOUT_CASES = [
    # (model, module name, dims it may be sliced on)
    ("stdit-tiny", "blocks.0.attn", "T"),
    ("stdit-tiny", "blocks.0.attn_temp", "S"),
    ("stdit-tiny", "blocks.1.attn_temp", "S"),
    ("stdit-tiny", "blocks.0.cross_attn", "TS"),
    ("stdit-tiny", "blocks.0.mlp", "TS"),
    ("stdit-tiny", "blocks.0.norm1", "TS"),
    ("stdit-tiny", "final_layer.linear", "TS"),
    ("latte-tiny", "blocks.0", "T"),  # spatial block
    ("latte-tiny", "blocks.1", "S"),  # first temporal block, adds the position table
    ("latte-tiny", "blocks.3", "S"),
    ("latte-tiny", "blocks.1.attn", "S"),
    ("latte-tiny", "blocks.2.cross_attn", "TS"),
]


@pytest.mark.parametrize("name,path,dims", LAYOUT_CASES)
def test_module_is_local_in_the_other_dim(name, path, dims):
    model = make_model(name)
    module = model.get_submodule(path)
    x, y, t0, mask = block_inputs(model)
    with torch.no_grad():
        full = call(module, x, y, t0, mask)
        for dim in "TS":
            idx = SLICES[dim]
            part = call(module, x[idx], y, t0, mask)
            if dim in dims:
                torch.testing.assert_close(part, full[idx])
            else:  # the check is sensitive: slicing the compute dim changes the result
                assert not torch.allclose(part, full[idx], atol=1e-4), dim


def test_final_layer_is_token_wise():
    model = make_model("stdit-tiny")
    x, _, _, _ = block_inputs(model)
    t = model.t_embedder(torch.tensor([3, 500]))
    with torch.no_grad():
        full = model.final_layer(x, t)
        torch.testing.assert_close(model.final_layer(x[:, 1:3, 4:9], t), full[:, 1:3, 4:9])


def test_position_dependent_modules_are_marked():
    for name in TINY:
        marked = {
            n: m.compute_dim
            for n, m in make_model(name).named_modules()
            if isinstance(m, Attention)
        }
        assert set(marked.values()) == {"S", "T"}
    # frame positions: a (T, C) table the parent passes to the blocks that use it
    stdit = make_model("stdit-tiny")
    assert [b.temporal_pos for b in stdit.blocks] == [True, False]
    latte = make_model("latte-tiny")
    assert [b.temporal_pos for b in latte.blocks] == [False, True, False, False]
    assert [b.attn_dim for b in latte.blocks] == ["S", "T", "S", "T"]
    assert [b.cross_attn is not None for b in latte.blocks] == [True, False, True, False]


# --- injectable attention core


class RecordingCore(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, q, k, v, mask=None):
        self.calls.append((tuple(q.shape), tuple(k.shape), None if mask is None else mask.shape))
        return sdpa_core(q, k, v, mask=mask)


def test_core_replacement_sees_documented_shapes():
    model = make_model("stdit-tiny")
    x, timestep, y, mask = make_inputs()
    ref = model(x, timestep, y, mask)
    block = model.blocks[0]
    cores = {"attn": RecordingCore(), "attn_temp": RecordingCore(), "cross_attn": RecordingCore()}
    for key, core in cores.items():
        getattr(block, key).core = core
    calls = []

    def plain_core(q, k, v, mask=None):  # a plain function works as well as a Module
        calls.append(q.shape)
        return sdpa_core(q, k, v, mask=mask)

    model.blocks[1].attn.core = plain_core
    torch.testing.assert_close(model(x, timestep, y, mask), ref)
    s = (H // 2) * (W // 2)
    assert cores["attn"].calls == [((B * T, s, 4, 8), (B * T, s, 4, 8), None)]
    assert cores["attn_temp"].calls == [((B * s, T, 4, 8), (B * s, T, 4, 8), None)]
    assert cores["cross_attn"].calls == [((B, T * s, 4, 8), (B, L, 4, 8), (B, L))]
    assert calls == [(B * T, s, 4, 8)]
    assert "blocks.0.attn.core" in dict(model.named_modules())  # a Module core registers
    assert not any("core" in k for k in model.state_dict())  # but holds no state


def test_heads_are_read_from_the_qkv_shape():
    """Two head-shards (narrow qkv, narrow proj) sum to the full attention: tensor parallel."""
    torch.manual_seed(0)
    c, heads, d = 32, 4, 8
    full = Attention(c, heads, attn_dim="T")
    x = torch.randn(B, T, 15, c)
    total = torch.zeros(B, T, 15, c)
    for r in range(2):
        part = Attention(c, heads, attn_dim="T")
        rows = torch.cat(
            [torch.arange(j * c + r * 2 * d, j * c + (r + 1) * 2 * d) for j in range(3)]
        )
        cols = torch.arange(r * 2 * d, (r + 1) * 2 * d)
        part.qkv = nn.Linear(c, 3 * 2 * d)
        part.proj = nn.Linear(2 * d, c)
        with torch.no_grad():
            part.qkv.weight.copy_(full.qkv.weight[rows])
            part.qkv.bias.copy_(full.qkv.bias[rows])
            part.proj.weight.copy_(full.proj.weight[:, cols])
            part.proj.bias.copy_(full.proj.bias if r == 0 else torch.zeros(c))
            total += part(x)
    with torch.no_grad():
        torch.testing.assert_close(total, full(x))


# --- registry and sizes


def test_registry():
    assert list_models() == sorted(CONFIGS)
    assert {"stdit-tiny", "stdit-xl/2", "stdit-xxl/2", "latte-tiny", "latte-xl/2"} <= set(CONFIGS)
    assert isinstance(CONFIGS["latte-xl/2"], LatteConfig)
    assert build_model("stdit-tiny", depth=3).config.depth == 3
    with pytest.raises(KeyError, match="stdit-tiny"):
        build_model("nope")
    with pytest.raises(TypeError, match="hidden"):
        build_model("stdit-tiny", hiden_size=64)
    with pytest.raises(ValueError, match="even"):
        LatteConfig(depth=3)
    with pytest.raises(ValueError, match="divisible"):
        STDiTConfig(hidden_size=36, num_heads=8)


def stdit_params(c: STDiTConfig) -> int:
    """Closed-form parameter count of STDiT (Open-Sora 1.0 architecture)."""
    d, f = c.hidden_size, int(c.hidden_size * c.mlp_ratio)
    attn = 4 * d * d + 4 * d  # qkv + proj
    cross = 4 * d * d + 4 * d  # q + kv + proj
    mlp = 2 * d * f + f + d
    block = 2 * attn + cross + mlp + 6 * d
    patch = 4 * c.in_channels * d + d
    t_emb = 256 * d + d + d * d + d
    t_block = 6 * d * d + 6 * d
    y_emb = c.caption_channels * d + d + d * d + d
    final = d * 4 * c.out_channels + 4 * c.out_channels + 2 * d
    return c.depth * block + patch + t_emb + t_block + y_emb + final


@pytest.mark.parametrize(
    "name,paper,tol",
    [("stdit-xl/2", 720e6, 0.06), ("stdit-xxl/2", 3e9, 0.03), ("stdit-tiny", None, None)],
)
def test_parameter_counts(name, paper, tol):
    with torch.device("meta"):
        model = build_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == stdit_params(CONFIGS[name])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if paper is not None:
        assert abs(n / paper - 1) < tol, n  # xl/2: 759.6M vs the paper's "720M"
