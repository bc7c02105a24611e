"""``dsp bench --model diffusers:NAME``: diffusers' video models, unchanged, in the sweep.

The model is the tiny random config of :mod:`dsp.integrations.diffusers.tiny` (fp32; the
sweep's ``--frames/--height/--width/--batch`` are its latent sizes, ``--depth``, ``--hidden``
and ``--heads`` override the transformers' layers, width and heads), parallelized with
:func:`dsp.integrations.diffusers.parallelize` and the config's strategy, planned before the
first step from shape-only copies of the inputs. :func:`dsp.bench.runner.rank_bench` times
it like dsp's own models (the same step, loss, gradient sync and byte counters).

A strategy that does not apply to a model fails with the integration's reason, recorded in
the row's ``error`` (megatron_sp: the declarations give no column/row weight styles;
ulysses on AnimateDiff: its motion modules cannot run on a frame shard).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch
from torch import nn

from dsp.integrations.diffusers.tiny import PREFIX, is_prefixed, unprefixed

__all__ = ["PREFIX", "is_diffusers", "model_config", "setup", "tiny_name"]

is_diffusers = is_prefixed  # "diffusers:NAME"
tiny_name = unprefixed  # "diffusers:latte" -> "latte"


def model_config(name: str, depth=None, hidden=None, heads=None) -> Dict[str, Any]:
    """Constructor overrides of the tiny ``name`` for ``--depth/--hidden/--heads``."""
    if depth is None and hidden is None and heads is None:
        return {}
    shapes = {"latte": (2, 8), "wan": (3, 8)}  # the tiny configs' heads and head width
    if name not in shapes:
        raise ValueError(
            f"--depth, --hidden and --heads apply to diffusers:latte and diffusers:wan, not "
            f"diffusers:{name}"
        )
    default_heads, head_dim = shapes[name]
    heads = heads or default_heads
    hidden = hidden or heads * head_dim
    if hidden % heads:
        raise ValueError(f"--hidden {hidden} is not divisible by --heads {heads}")
    out: Dict[str, Any] = {"num_attention_heads": heads, "attention_head_dim": hidden // heads}
    if depth is not None:
        out["num_layers"] = depth
    if name == "latte":
        out["cross_attention_dim"] = hidden  # its cross-attention runs at the model's width
    else:
        out["ffn_dim"] = 2 * hidden
    return out


class _Handle:
    """The strategy interface :func:`~dsp.bench.runner.rank_bench` uses (``group``,
    ``sync_grads(model)``), over a :class:`~dsp.integrations.diffusers.DiffusersParallel`."""

    def __init__(self, handle):
        self.handle, self.group = handle, handle.group

    def sync_grads(self, model: nn.Module) -> None:
        self.handle.sync_grads()


def setup(cfg) -> Tuple[nn.Module, Callable[[], torch.Tensor], torch.Tensor, _Handle]:
    """``(model, forward, target, strategy)`` for a :class:`~dsp.bench.runner.BenchConfig`
    whose model is ``diffusers:NAME``: ``forward()`` runs one call on this rank's inputs and
    returns the output; the plan is made here (for the grad mode of ``cfg.mode``)."""
    from dsp.integrations.diffusers import parallelize
    from dsp.integrations.diffusers.tiny import build

    name = tiny_name(cfg.model)
    if cfg.strategy == "dsp" and cfg.plan != "auto":
        raise ValueError(
            f"--plan {cfg.plan}: diffusers models are planned per input shapes by the planner "
            "(plan auto); hand placements and plan files are for dsp's own models"
        )
    model, args, kwargs = build(
        name,
        dtype=torch.float32,
        batch=cfg.batch,
        frames=cfg.frames,
        height=cfg.height,
        width=cfg.width,
        text_len=cfg.text_len,
        config=model_config(name, cfg.depth, cfg.hidden, cfg.heads),
    )
    kwargs = {**kwargs, "return_dict": False}
    with torch.no_grad() if cfg.mode == "infer" else torch.enable_grad():
        example = (*(_meta(a) for a in args), {k: _meta(v) for k, v in kwargs.items()})
        handle = parallelize(model, strategy=cfg.strategy, example_inputs=example, **cfg.options)
    g = torch.Generator().manual_seed(2)
    shape = list(args[0].shape)  # (B, C, F, H, W); SVD's sample is (B, F, C, H, W)
    shape[2 if name == "svd" else 1] = model.config.out_channels
    target = torch.randn(shape, generator=g)

    def forward() -> torch.Tensor:
        return model(*args, **kwargs)[0]

    return model, forward, target, _Handle(handle)


def _meta(v):
    return v.detach().to("meta") if torch.is_tensor(v) else v
