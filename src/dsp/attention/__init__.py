"""Attention cores: drop-in replacements for a model's ``core(q, k, v, mask=None)``."""

from dsp.attention.ring import RingCore, ring_attention, ring_bytes

__all__ = ["RingCore", "ring_attention", "ring_bytes"]
