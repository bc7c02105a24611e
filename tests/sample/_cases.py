"""Per-rank bodies for the sampling tests."""

from __future__ import annotations

from dsp.sample import SampleConfig, sample


def latents(**kw):
    result = sample(SampleConfig(**kw))
    return {"latents": result.latents, "video": result.video, "layout": result.layout}
