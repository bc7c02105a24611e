"""Models without closed forms: one rank of the engine, run on meta tensors.

The formulas of :mod:`.flops`, :mod:`.volume` and :mod:`.memory` cover the video DiTs (STDiT,
Latte). For any other registered model (the axial transformer, the Evoformer) :func:`rank_cost`
costs one step of rank ``r`` of an ``N``-rank job by running it the way that rank would, on
the ``meta`` device (shapes only: no memory, no arithmetic):

1. the strategy makes its plan with the generator :meth:`dsp.strategies.Strategy.apply` uses,
   and the engine's dry run checks it (:meth:`dsp.parallelize.Recording.cost`, as
   ``dsp plan --dry-run``): a strategy that cannot run the model raises the engine's own
   :class:`~dsp.parallelize.PlanError` (Ulysses, Ring and USP on a model whose stages are not
   all attentions; Megatron-SP where a module computes over the resting dim outside its
   regions);
2. :func:`dsp.parallelize` installs the plan's hooks, and a forward (and backward) runs under
   torch's fake process group of ``N`` ranks (collectives return at once; registered for
   meta tensors too), while
   :func:`dsp.comm_log` counts the bytes of every collective the hooks issue (as on a real
   run: the sizes are the local shards'), :class:`torch.utils.flop_counter.FlopCounterMode`
   counts FLOPs (forward and backward apart) and saved-tensor hooks count the activations
   autograd keeps (each storage once, parameters excluded, as :func:`dsp.memory.saved_activations`
   does on real tensors). ``F.scaled_dot_product_attention`` runs as the memory-efficient
   fused kernel (on meta, plain SDPA would decompose into the math path and save the whole
   attention matrix): it saves q, k, v, the output and the log-sum-exp, as FlashAttention on a
   GPU and torch's fused CPU kernel do; its FLOPs are kept apart so that the attention
   backward can be priced as :func:`dsp.sim.flops.step_flops` prices it (``attn_bwd``);
3. marks at every block's entry and exit split out what activation checkpointing changes: the
   blocks' forward FLOPs and collectives (recomputed in backward), their saved activations
   (replaced by each block's input, plus one block rebuilt at a time).

It needs ``torch.distributed`` uninitialised in this process (the ``dsp simulate`` command;
tests outside rank pools) and costs one meta forward and backward per rank costed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import torch

from dsp.sim.volume import Transfer

__all__ = ["RankCost", "inputs", "rank_cost", "ranks", "KINDS"]

#: ``dsp.comm_log`` op -> the link model's kind (:func:`dsp.sim.step.transfer_time`)
KINDS = {
    "all_to_all": "a2a",
    "all_gather": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "send_recv": "p2p",
    "all_reduce": "allreduce",
}


@dataclass(frozen=True)
class RankCost:
    """One rank's step (see the module doc). Bytes and FLOPs without recompute.

    Attributes:
        transfers: the strategy's collectives, by (op, phase, group size), forward and
            backward (``mode="train"``).
        recompute: the forward collectives issued inside the blocks (what checkpointing
            issues again, in backward).
        flops: ``forward``, ``backward`` and ``blocks_forward`` (recomputed under checkpointing),
            ``attn_forward`` and ``attn_backward`` (the fused attention kernels' share of them).
        saved: activation bytes autograd keeps from forward to backward.
        saved_checkpointed: the same under activation checkpointing: what is saved outside
            the blocks plus each block's input.
        block_max: the largest block's saved bytes (rebuilt one at a time).
        params, tp_params: parameters of the model, and those the plan shards over the group
            (Megatron-SP's tensor-parallel weights; this rank holds ``1/N`` of them).
        depth: number of blocks.
    """

    transfers: Tuple[Transfer, ...]
    recompute: Tuple[Transfer, ...]
    flops: Dict[str, float]
    saved: float
    saved_checkpointed: float
    block_max: float
    params: int
    tp_params: int
    depth: int


def inputs(model: torch.nn.Module, w) -> tuple:
    """Meta example inputs of ``model`` for workload ``w`` (as ``dsp plan`` makes them):
    Evoformer ``(msa, pair)`` (trunk inputs that need gradients), an axial transformer's video,
    a video DiT's ``(video, timestep, text)``."""
    c, b = model.config, w.batch
    meta = {"device": "meta", "dtype": torch.float32 if w.elem == 4 else torch.bfloat16}
    if hasattr(c, "c_m"):  # Evoformer
        msa = torch.empty(b, w.msa, w.residues, c.c_m, **meta)
        pair = torch.empty(b, w.residues, w.residues, c.c_z, **meta)
        return (msa.requires_grad_(w.mode == "train"), pair.requires_grad_(w.mode == "train"))
    video = torch.empty(b, c.in_channels, w.frames, w.height, w.width, **meta)
    if not hasattr(c, "caption_channels"):  # axial
        return (video,)
    timestep = torch.zeros(b, dtype=torch.int64, device="meta")  # as dsp bench plans
    return (video, timestep, torch.empty(b, w.text_len, c.caption_channels, **meta))


class _FusedSdpa(torch.overrides.TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as the memory-efficient fused kernel (see module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        bias = None
        if mask is not None and mask.dtype == torch.bool:
            shape = (*q.shape[:-2], q.shape[-2], k.shape[-2])
            bias = torch.zeros(shape, dtype=q.dtype, device=q.device).masked_fill(~mask, -1e4)
        elif mask is not None:
            bias = mask.expand(*q.shape[:-2], q.shape[-2], k.shape[-2])
        causal = kwargs.get("is_causal", False)
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, q.requires_grad, 0.0, causal, scale=kwargs.get("scale")
        )
        return out[0]


def _attention_flops(counter) -> Dict[str, float]:
    """The fused attention kernels' FLOPs counted so far, forward and backward."""
    ops = counter.get_flop_counts().get("Global", {})
    fwd = bwd = 0
    for op, count in ops.items():
        if "scaled_dot_product" in str(op):
            if "backward" in str(op):
                bwd += count
            else:
                fwd += count
    return {"attn_forward": fwd, "attn_backward": bwd}


_BACKEND = "dspfake"


@contextlib.contextmanager
def _fake_group(n: int, r: int) -> Iterator[None]:
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError(
            "dsp simulate: costing a model without closed forms runs the engine on meta tensors "
            "under a fake process group; torch.distributed is already initialised in this "
            "process (run it outside the job's ranks)"
        )
    from torch.testing._internal.distributed import fake_pg

    if _BACKEND not in dist.Backend.backend_list:  # torch's "fake", on meta tensors too
        dist.Backend.register_backend(
            _BACKEND, fake_pg._create_fake_pg, extended_api=True, devices=["cpu", "meta"]
        )
    dist.init_process_group(_BACKEND, store=fake_pg.FakeStore(), rank=r, world_size=n)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _plan(model, x: tuple, w):
    """The strategy's plan for ``model`` on ``w.sp`` ranks, checked by the engine's dry run."""
    from dsp.parallelize import record
    from dsp.strategies import get_strategy

    options = {"ulysses_degree": w.ulysses_degree} if w.strategy == "usp" else {}
    plan = get_strategy(w.strategy, None, plan=w.plan, **options).make_plan(model, x)
    record(model, x).cost(plan, w.sp)  # raises PlanError where the plan cannot run
    return plan


def _transfers(records) -> List[Transfer]:
    """Records summed by (op, phase, group size): bytes and number of calls."""
    out: Dict[tuple, Transfer] = {}
    for rec in records:
        if rec.meta:
            continue
        phase = rec.phase
        key = (rec.op, phase, rec.group_size)
        t = out.get(key)
        kind = KINDS.get(rec.op, "a2a")
        ring = rec.group_size if kind == "p2p" else 0
        out[key] = Transfer(
            kind,
            phase,
            (t.bytes if t else 0) + rec.bytes_sent,
            (t.calls if t else 0) + 1,
            rec.group_size,
            rec.op,
            ring,
        )
    return list(out.values())


def _key(w) -> tuple:
    fields = (
        "model", "strategy", "frames", "height", "width", "batch", "mode", "sp", "text_len",
        "elem", "ulysses_degree", "msa", "residues", "plan",
    )  # fmt: skip
    return tuple(getattr(w, f) for f in fields) + (tuple(sorted(w.overrides.items())),)


_CACHE: Dict[tuple, RankCost] = {}


def rank_cost(w, r: int = 0) -> RankCost:
    """:class:`RankCost` of rank ``r`` of workload ``w`` (cached per workload and rank)."""
    key = (_key(w), r)
    if key not in _CACHE:
        if len(_CACHE) > 256:
            _CACHE.clear()
        _CACHE[key] = _rank_cost(w, r)
    return _CACHE[key]


def _rank_cost(w, r: int) -> RankCost:
    from torch.utils.flop_counter import FlopCounterMode

    import dsp
    from dsp.models import build_model

    n = 1 if w.strategy == "none" else w.sp
    with torch.device("meta"):
        model = build_model(w.model, **w.overrides)
    if w.elem != 4:
        model = model.to(torch.bfloat16)
    x = inputs(model, w)
    train = w.mode == "train"
    with contextlib.ExitStack() as stack:
        handle = None
        if n > 1:
            stack.enter_context(_fake_group(n, r))
            plan = _plan(model, x, w)
            if plan is not None:
                handle = dsp.parallelize(model, plan)
        tp = 0
        if handle is not None:
            tp = sum(p.numel() for k, p in model.named_parameters() if handle.is_tensor_parallel(k))
        skip = {p.untyped_storage()._cdata for p in model.parameters()}
        saved: Dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st._cdata not in skip:
                saved.setdefault(st._cdata, st.nbytes())
            return t

        marks: List[dict] = []
        log_box: List = []
        counter = FlopCounterMode(display=False)

        def mark(kind):
            def hook(_mod, args, *rest):
                log = log_box[0]
                marks.append(
                    {
                        "kind": kind,
                        "records": len(log.records),
                        "flops": counter.get_total_flops(),
                        "saved": sum(saved.values()),
                        "input": sum(
                            a.numel() * a.element_size() for a in args if torch.is_tensor(a)
                        ),
                    }
                )

            return hook

        blocks = list(getattr(model, "blocks", ()))
        hooks = [b.register_forward_pre_hook(mark("in")) for b in blocks]
        hooks += [b.register_forward_hook(mark("out")) for b in blocks]
        with dsp.comm_log() as log, counter, _FusedSdpa():
            log_box.append(log)
            grad = torch.enable_grad() if train else torch.no_grad()
            with grad, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(*x)
            forward_flops = counter.get_total_flops()
            if train:
                outs = out if isinstance(out, tuple) else (out,)
                sum(o.float().sum() for o in outs).backward()
        for h in hooks:
            h.remove()
        if handle is not None:
            handle.remove()
    pairs = list(zip(marks[0::2], marks[1::2]))
    inside = [rec for a, b in pairs for rec in log.records[a["records"] : b["records"]]]
    block_saved = [b["saved"] - a["saved"] for a, b in pairs]
    total_saved = sum(saved.values()) if train else 0
    checkpointed = total_saved - sum(block_saved) + sum(a["input"] for a, _ in pairs)
    return RankCost(
        transfers=tuple(_transfers(log.records)),
        recompute=tuple(_transfers(inside)) if train else (),
        flops={
            "forward": forward_flops,
            "backward": counter.get_total_flops() - forward_flops,
            "blocks_forward": sum(b["flops"] - a["flops"] for a, b in pairs),
            **_attention_flops(counter),
        },
        saved=total_saved,
        saved_checkpointed=checkpointed if train else 0,
        block_max=max(block_saved, default=0) if train else 0,
        params=sum(p.numel() for p in model.parameters()),
        tp_params=tp,
        depth=len(blocks),
    )


def ranks(w) -> List[int]:
    """The ranks worth costing in a group of ``w.sp``: one per distinct pattern of long and
    short shards over the sequence dims (``torch.tensor_split`` gives the first ``L mod N``
    ranks one more element of a dim of length ``L``); ranks with the same pattern hold the
    same shapes, so they compute, save and send alike. Even sizes: rank 0 alone."""
    from dsp.models import CONFIGS, EvoformerConfig

    config = CONFIGS[w.model]
    if isinstance(config, EvoformerConfig):
        dims = (w.msa, w.residues)
    else:
        pt, ph, pw = config.patch_size
        dims = (w.frames // pt, w.height // ph, w.width // pw)
    n = w.sp
    seen: Dict[tuple, int] = {}
    for r in range(n):
        seen.setdefault(tuple(r < length % n for length in dims), r)
    return sorted(seen.values())
