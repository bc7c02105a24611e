"""Per-rank bodies for the cost model's multi-rank checks (run inside a RankPool)."""

from __future__ import annotations

import torch

import dsp
from dsp.memory import saved_activations
from dsp.models import build_model
from dsp.strategies import get_strategy

TEXT_LEN = 6


def inputs(model, shape, dtype=torch.float32):
    b, t, h, w = shape
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c.in_channels, t, h, w, generator=g, dtype=dtype)
    y = torch.randn(b, TEXT_LEN, c.caption_channels, generator=g, dtype=dtype)
    return x, torch.randint(0, 1000, (b,), generator=g), y


def measure(model_name, strategy, shape, options=None):
    """This rank's bytes (forward, backward, gradient sync) and saved activations, fp32."""
    torch.manual_seed(0)
    model = build_model(model_name, zero_init=False)
    x, t, y = inputs(model, shape)
    strat = get_strategy(strategy, **(options or {}))
    strat.apply(model)
    with dsp.comm_log() as log:
        with saved_activations(model.parameters()) as saved:
            out = model(x, t, y)
        out.sum().backward()
    with dsp.comm_log() as sync:
        strat.sync_grads(model)
    return {
        "forward": log.sent("forward"),
        "backward": log.sent("backward"),
        "sync": sync.bytes_sent,
        "saved": saved.bytes,
    }


def flops(model_name, strategy, shape, core=None):
    """This rank's FLOPs of one forward + backward by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(model_name, zero_init=False)
    if core is not None:
        for m in model.modules():
            if hasattr(m, "core"):
                m.core = core
    x, t, y = inputs(model, shape)
    get_strategy(strategy).apply(model)
    with FlopCounterMode(display=False) as fc:
        model(x, t, y).sum().backward()
    return fc.get_total_flops()


def math_core(q, k, v, mask=None):
    """Attention as two matmuls (counted by flop_counter, unlike CPU SDPA)."""
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (N, H, L, D)
    a = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        a = a.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (a.softmax(-1) @ v).transpose(1, 2)  # (N, L, H, D)


def workload(model, strategy="none", n=1, shape=(1, 8, 12, 16), **kw):
    """A :class:`~dsp.sim.workload.Workload` of the shapes these tests run: fp32, the text
    length of :func:`inputs`, no activation checkpointing unless asked."""
    from dsp.sim.workload import Workload

    b, t, h, w = shape
    kw.setdefault("activation_checkpointing", False)
    return Workload(
        model=model,
        strategy=strategy,
        frames=t,
        height=h,
        width=w,
        batch=b,
        sp=n,
        text_len=TEXT_LEN,
        elem=4,
        **kw,
    )


def generic_inputs(name, model, shape):
    """fp32 inputs as :func:`dsp.sim.traced.inputs` makes them on meta: the Evoformer's
    ``(msa, pair)`` (needing gradients) for ``shape = (B, M, R)``, an axial transformer's video
    for ``shape = (B, T, H, W)``."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    if name.startswith("evoformer"):
        b, m, r = shape
        msa = torch.randn(b, m, r, c.c_m, generator=g).requires_grad_()
        return (msa, torch.randn(b, r, r, c.c_z, generator=g).requires_grad_())
    b, t, h, w = shape
    return (torch.randn(b, c.in_channels, t, h, w, generator=g),)


def measure_many(cases):
    """This rank's bytes and saved activations (the model's own attention core), and FLOPs
    (torch.utils.flop_counter, attention as matmuls so that it counts them) for each
    ``(model, strategy, shape, options)``: two real fp32 steps each. ``options`` go to the
    strategy, except ``"checkpoint": True``: activation checkpointing as ``dsp train`` applies
    it (:func:`dsp.train.wrap.apply_activation_checkpointing`)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dsp.models import CONFIGS

    out = []
    for name, strategy, shape, options in cases:
        dit = hasattr(CONFIGS[name], "caption_channels")
        got = {}
        for core in (None, math_core):
            torch.manual_seed(0)
            model = build_model(name, zero_init=False) if dit else build_model(name)
            if core is not None:
                for m in model.modules():
                    if hasattr(m, "core"):
                        m.core = core
            x = inputs(model, shape) if dit else generic_inputs(name, model, shape)
            opts = dict(options or {})
            ac = opts.pop("checkpoint", False)
            get_strategy(strategy, **opts).apply(model, x)
            if ac:
                from dsp.train.wrap import apply_activation_checkpointing

                apply_activation_checkpointing(model)
            with dsp.comm_log() as log, FlopCounterMode(display=False) as fc:
                with saved_activations(model.parameters()) as saved:
                    y = model(*x)
                sum(o.sum() for o in (y if isinstance(y, tuple) else (y,))).backward()
            if core is None:
                got.update(forward=log.sent("forward"), backward=log.sent("backward"))
                got.update(saved=saved.bytes)
            else:
                got["flops"] = fc.get_total_flops()
        out.append(got)
    return out
