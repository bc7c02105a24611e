"""Per-rank bodies: a model parallelized by ``dsp.parallelize`` equals the single process."""

from __future__ import annotations

import copy
import functools

import torch
import torch.distributed as dist

import dsp
import dsp.parallelize as P
from dsp.models import build_model
from dsp.models.plans import hand_plan
from dsp.sim.hardware import cluster
from dsp.sim.plan_price import timing

TEXT_LEN = 6
SHAPES = {  # uneven over 2, 3 and 4 ranks, every sequence dim >= 4
    "stdit-tiny": (5, 6, 10),  # T = 5, S = 3 x 5 = 15
    "latte-tiny": (5, 6, 10),
    "axial-tiny": (5, 10, 14),  # T = 5, H = 5, W = 7 after 1x2x2 patches
    "evoformer-tiny": (5, 7),  # M = 5 sequences, R = 7 residues
}


def make_inputs(name: str, model, seed: int = 0, shape=None):
    """Float64 inputs; the float ones require grad (their gradients are compared).
    ``shape``: other sizes than :data:`SHAPES`."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    if name.startswith("evoformer"):
        m, r = shape or SHAPES[name]
        c = model.config
        return (randn(1, m, r, c.c_m), randn(1, r, r, c.c_z))
    t, h, w = shape or SHAPES[name]
    if name.startswith("axial"):
        return (randn(1, model.config.in_channels, t, h, w),)
    c = model.config
    x = randn(2, c.in_channels, t, h, w)
    timestep = torch.tensor([3, 500])
    y = randn(2, TEXT_LEN, c.caption_channels)
    mask = torch.arange(TEXT_LEN)[None] < torch.tensor([[TEXT_LEN], [TEXT_LEN - 2]])
    return (x, timestep, y, mask)


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def run(model, inputs, weights):
    """Forward, a weighted-sum loss, backward; the outputs and the inputs' gradients."""
    inputs = tuple(
        x.detach().clone().requires_grad_() if torch.is_tensor(x) and x.requires_grad else x
        for x in inputs
    )
    outs = _outputs(model(*inputs))
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    return outs, [x.grad for x in inputs if torch.is_tensor(x) and x.requires_grad]


def _mean(t):
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


#: A cluster on which overlapping pays for the tiny models: a slow link, slow compute of the
#: same order, free slices (``--chunks auto`` then slices every stage that can).
SLOW_LINK = {
    "nodes": 8,
    "gpus_per_node": 1,
    "gpu": {"name": "slow", "peak_flops": 1e8, "mfu": 1.0, "memory": 1e9},
    "inter": {"name": "slow", "bandwidth": 1e6, "latency": 0.0, "a2a_efficiency": 1.0},
    "intra": {"name": "slow", "bandwidth": 1e6, "latency": 0.0, "a2a_efficiency": 1.0},
    "slice_overhead": 0.0,
}


def _reference(name: str, shape):
    """A float64 model, its one-process copy, inputs, output weights and the copy's outputs
    and input gradients (the parameter gradients stay on the copy)."""
    torch.manual_seed(0)
    model = build_model(name).double()
    ref = copy.deepcopy(model)
    inputs = make_inputs(name, model, shape=shape)
    g = torch.Generator().manual_seed(1)
    weights = [
        torch.randn(o.shape, generator=g, dtype=torch.float64) for o in _outputs(ref(*inputs))
    ]
    outs_ref, grads_ref = run(ref, inputs, weights)
    return model, ref, inputs, weights, outs_ref, grads_ref


def equality(name: str, which: str = "planner", atol: float = 1e-9, shape=None):
    """Output, every parameter gradient and the input gradients equal one process.

    Returns this rank's measured bytes and the dry run's prediction (all ranks together).
    """
    n = dist.get_world_size()
    model, ref, inputs, weights, outs_ref, grads_ref = _reference(name, shape)

    rec = P.record(model, inputs)
    if which == "chunks:auto":  # slice counts the planner chooses on a slow link
        plan = rec.plan(n, chunks="auto", timing=timing(cluster(SLOW_LINK), n))
    elif which.startswith("chunks:"):  # the planner's plan, switches overlapped in k slices
        plan = rec.plan(n, chunks=int(which.split(":")[1]))
    else:
        plan = rec.plan(n) if which == "planner" else hand_plan(model)
    predicted = rec.cost(plan, n)
    handle = dsp.parallelize(model, plan)
    with dsp.comm_log() as log:
        outs, grads = run(model, inputs, weights)
    handle.sync_grads()
    handle.remove()

    for o, o_ref in zip(outs, outs_ref):
        torch.testing.assert_close(o, o_ref, atol=atol, rtol=0)
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[pname].grad, atol=atol, rtol=0, msg=pname)
    for gx, gx_ref in zip(grads, grads_ref):
        torch.testing.assert_close(_mean(gx), gx_ref, atol=atol, rtol=0)
    return {
        "plan": plan.to_dict(),
        "forward": log.sent("forward"),
        "backward": log.sent("backward"),
        "predicted_forward": predicted.total_forward,
        "predicted_backward": predicted.total_backward,
    }


class _Outgoing(torch.nn.Module):
    """``z_ij + sum_k a_ik b_jk`` with no dsp attributes: it needs J whole and ``b`` whole.

    The residual is inside: a stream's entry and block boundaries must return the stream."""

    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = torch.nn.Linear(c, c), torch.nn.Linear(c, c)

    def forward(self, z):
        return z + torch.einsum("bikc,bjkc->bijc", self.a(z), self.b(z))


class PairToy(torch.nn.Module):
    """Two outgoing updates on a pair (B, I, J, C), then a token-wise head."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Outgoing(c) for _ in range(2))
        self.head = torch.nn.Linear(c, 2)

    def forward(self, z):
        for block in self.blocks:
            z = block(z)
        return self.head(z)


def declared_as_data():
    """A model without attributes, declared through ``compute=``/``operands=`` and a hand plan
    that gathers an undeclared module: both equal one process."""
    n = dist.get_world_size()
    torch.manual_seed(0)
    model = PairToy().double()
    ref = copy.deepcopy(model)
    z = torch.randn(1, 7, 7, 4, dtype=torch.float64, requires_grad=True)
    ref(z).square().sum().backward()
    stream = P.Stream("pair", ("B", "I", "J", "C"), "blocks.0", "head", "I")
    options = {
        "streams": [stream],
        "compute": {"blocks.*": "J"},  # segment-wise: not blocks.0.a
        "operands": {"blocks.*.b": ("I", "J")},
    }
    plan = P.plan_model(model, (z,), n, **options)
    by_hand = P.Plan(
        (stream,),
        tuple(
            st
            for i in range(2)
            for st in (
                P.Stage(f"blocks.{i}", "pair", "J", "I"),
                P.Stage(f"blocks.{i}.b", "pair", kind="gather_output"),
            )
        ),
    )
    declared = {k: v for k, v in options.items() if k != "streams"}
    cost = P.validate(plan, model, n, (z,), **declared).total
    assert P.validate(by_hand, model, n, (z,)).total == cost  # the hand plan is the same
    for p in (plan, by_hand):
        model.zero_grad()
        handle = dsp.parallelize(model, p)
        zz = z.detach().clone().requires_grad_()
        model(zz).square().sum().backward()
        handle.sync_grads()
        handle.remove()
        for (name, a), b in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=0, msg=name)
        torch.testing.assert_close(_mean(zz.grad), z.grad, atol=1e-9, rtol=0)
    return plan.to_dict()


def checkpointed_chunks(name: str, shape, early_stop: bool):
    """A chunked plan under non-reentrant activation checkpointing (early stop of the
    recompute on or off) of every block and, inside, of every sliced stage itself (its
    recompute then ends inside the last slice's compute, before the switches back are waited
    for): output and gradients equal one process, and no transfer is left in flight after
    the backward."""
    import torch.utils.checkpoint as ckpt

    from dsp.comm.overlap import in_flight
    from dsp.train.wrap import apply_activation_checkpointing

    n = dist.get_world_size()
    model, ref, inputs, weights, outs_ref, grads_ref = _reference(name, shape)
    plan = P.record(model, inputs).plan(n, chunks=2)
    assert any(st.chunks for st in plan.stages)
    handle = dsp.parallelize(model, plan)
    modules = dict(model.named_modules())
    for st in plan.stages:
        if st.chunks:
            mod = modules[st.module]
            mod.forward = functools.partial(ckpt.checkpoint, mod.forward, use_reentrant=False)
    apply_activation_checkpointing(model)
    before = in_flight()
    with ckpt.set_checkpoint_early_stop(early_stop):
        outs, grads = run(model, inputs, weights)
    left = in_flight() - before
    handle.sync_grads()
    handle.remove()
    for o, o_ref in zip(outs, outs_ref):
        torch.testing.assert_close(o, o_ref, atol=1e-9, rtol=0)
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[pname].grad, atol=1e-9, rtol=0, msg=pname)
    return left
