"""Procedural data: deterministic by sample index, codec inverse, prompts, errors."""

import pytest
import torch

from dsp.data import CaptionEncoder, MovingShapes, PatchCodec, make_batch, parse_prompt


def _batch(indices, seed=0, dropout=0.3):
    data = MovingShapes(8, 16, 16, seed=seed)
    return make_batch(
        indices, data, PatchCodec(2), CaptionEncoder(16, seed=seed), cond_dropout=dropout
    )


def test_batches_do_not_depend_on_how_they_are_split():
    whole = _batch(range(8))
    halves = [_batch(range(0, 3)), _batch(range(3, 8))]
    for name in ("x0", "noise", "t", "y", "mask"):
        joined = torch.cat([getattr(h, name) for h in halves])
        assert torch.equal(getattr(whole, name), joined), name
    assert not torch.equal(_batch(range(4)).x0, _batch(range(4), seed=1).x0)
    assert whole.x0.shape == (8, 4, 8, 8, 8) and whole.noise.shape == whole.x0.shape
    assert whole.mask[:, 0].all()  # the null caption keeps one token


def test_videos_move_and_stay_in_range():
    data = MovingShapes(6, 16, 16)
    video, spec = data[3]
    assert video.shape == (3, 6, 16, 16) and video.min() >= -1 and video.max() <= 1
    assert (video > -1).any(), "the shape is visible"
    assert not torch.equal(video[:, 0], video[:, -1]), f"{spec.caption} does not move"


def test_codec_decode_is_a_right_inverse():
    codec = PatchCodec(4)
    z = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(codec.encode(codec.decode(z)), z, rtol=0, atol=1e-12)
    x = torch.rand(1, 3, 2, 8, 8) * 2 - 1
    once = codec.decode(codec.encode(x))
    torch.testing.assert_close(codec.decode(codec.encode(once)), once)  # a projection
    with pytest.raises(ValueError, match="even"):
        PatchCodec(3)
    with pytest.raises(ValueError, match="divisible by the codec factor 4"):
        codec.latent_shape(4, 10, 8)


def test_prompts():
    assert parse_prompt("left red circle") == parse_prompt("red circle left")
    with pytest.raises(ValueError, match="'purple' is an unknown word"):
        parse_prompt("purple circle left")
    with pytest.raises(ValueError, match="lacks a motion"):
        parse_prompt("red circle")
    y, mask = CaptionEncoder(16).null(2)
    assert mask.tolist() == [[True, False, False]] * 2 and (y[:, 1:] == 0).all()
