"""The 3-axis axial video transformer: shapes, gradients, and the layout rules that let
``dsp.parallelize`` act from outside (each attention needs only its own axis whole)."""

import pytest
import torch

from dsp.models import AxialAttention, AxialConfig, build_model
from dsp.models.layers import sdpa_core


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model("axial-tiny", **overrides)


def video(t=5, h=10, w=14, seed=1):
    return torch.randn(2, 4, t, h, w, generator=torch.Generator().manual_seed(seed))


def test_forward_shape_determinism_and_run_time_sizes():
    model = make_model()
    out = model(video())
    assert out.shape == (2, 4, 5, 10, 14) and torch.isfinite(out).all()
    assert torch.equal(out, make_model()(video()))
    for t, h, w in [(1, 2, 2), (3, 8, 4), (7, 6, 10)]:
        assert model(video(t, h, w)).shape == (2, 4, t, h, w)
    with pytest.raises(ValueError, match="W=9"):
        model(video(w=9))


def test_backward_reaches_every_parameter():
    model = make_model()
    model(video()).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


SLICES = {1: slice(1, 4), 2: slice(2, 4), 3: slice(0, 5)}  # on T, H, W of (B, T, H, W, C)


@pytest.mark.parametrize("axis", ["T", "H", "W"])
def test_attention_needs_only_its_own_axis(axis):
    torch.manual_seed(0)
    attn = AxialAttention(32, 4, axis=axis)
    assert attn.compute_dim == axis
    x = torch.randn(2, 5, 6, 7, 32)
    with torch.no_grad():
        full = attn(x)
        own = 1 + "THW".index(axis)
        for d, sl in SLICES.items():
            idx = (slice(None),) * d + (sl,)
            part = attn(x[idx])
            if d == own:  # slicing the attended axis changes the result (the check is sensitive)
                assert not torch.allclose(part, full[idx], atol=1e-4)
            else:
                torch.testing.assert_close(part, full[idx])


def test_every_axis_is_marked_and_nothing_else():
    model = make_model()
    marked = {n: m.compute_dim for n, m in model.named_modules() if hasattr(m, "compute_dim")}
    assert marked == {
        f"blocks.{i}.attn_{a.lower()}": a for i in range(model.config.depth) for a in "THW"
    }


def test_core_is_replaceable():
    model = make_model()
    x = video()
    ref = model(x)
    calls = []

    def core(q, k, v, mask=None):
        calls.append(q.shape)
        return sdpa_core(q, k, v, mask=mask)

    model.blocks[0].attn_h.core = core
    torch.testing.assert_close(model(x), ref)
    assert calls == [(2 * 5 * 7, 5, 4, 8)]  # (B*T*w, h, heads, D)


def test_config_checks():
    assert build_model("axial-tiny", depth=3).config.depth == 3
    with pytest.raises(ValueError, match="divisible"):
        AxialConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="axis"):
        AxialAttention(32, 4, axis="S")
