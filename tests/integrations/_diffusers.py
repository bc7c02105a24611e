"""Per-rank bodies: diffusers' models, unchanged, under dsp.integrations.diffusers.

Tiny random configs (dsp.integrations.diffusers.tiny: no downloads), fp64, B = 2, F = 5 frames
of 4 x 3 patches (uneven over 2 and 3 ranks).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.distributed as dist

import dsp
from dsp.integrations.diffusers import parallelize, tiny

B, F, H, W = 2, 5, 8, 6  # latent frames and size; patches 2 x 2: 4 x 3 per frame


def _tiny(name: str, frames: int = F):
    """``(model, (x, kwargs))``: the tiny fp64 model of dsp.integrations.diffusers.tiny."""
    model, args, kwargs = tiny.build(name, batch=B, frames=frames, height=H, width=W)
    return model, (*args, kwargs)


def latte(frames: int = F):
    return _tiny("latte", frames)


def wan():
    return _tiny("wan")


def animatediff():
    return _tiny("animatediff")


def svd():
    return _tiny("svd")


MODELS = {"latte": latte, "wan": wan, "animatediff": animatediff, "svd": svd}


def _mean(t):
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _run(model, inputs, w):
    x = inputs[0].detach().clone().requires_grad_()
    (out,) = model(x, **inputs[1], return_dict=False)
    (out * w).sum().backward()
    return out, x.grad


#: Gradients' tolerance relative to each gradient's largest entry. Wan computes its norms and
#: modulation in fp32 (``.float()``) even in an fp64 model, so its backward sums over tokens
#: in fp32, in another order on a shard than in one process: 1e-7 relative, not 1e-16.
GRAD_RTOL = {"latte": 0.0, "wan": 1e-6, "animatediff": 0.0, "svd": 0.0}


def equality(
    name: str,
    strategy: str = "dsp",
    atol: float = 1e-9,
    frames: int = F,
    checkpoint: bool = False,
    **options,
):
    """Output, every parameter gradient and the input gradient equal one process; returns
    this rank's bytes, the dry run's total and the plan's stage kinds."""
    model, inputs = latte(frames) if name == "latte" else MODELS[name]()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    (out_ref,) = ref(inputs[0], **inputs[1], return_dict=False)
    w = torch.randn(out_ref.shape, generator=g, dtype=out_ref.dtype)
    ref.zero_grad()
    out_ref, gx_ref = _run(ref, inputs, w)
    if checkpoint:  # diffusers' own activation checkpointing, per block, on the sharded model
        model.enable_gradient_checkpointing()
    handle = parallelize(model, strategy=strategy, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dsp.comm_log() as log:
            out, gx = _run(model, inputs, w)
    handle.sync_grads()
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=0)
    n_grads = 0
    for (pname, a), b in zip(model.named_parameters(), ref.parameters()):
        if b.grad is None:
            assert a.grad is None, pname
            continue
        tol = max(atol, GRAD_RTOL[name] * b.grad.abs().max().item())
        torch.testing.assert_close(a.grad, b.grad, atol=tol, rtol=0, msg=pname)
        n_grads += 1
    tol = max(atol, GRAD_RTOL[name] * gx_ref.abs().max().item())
    torch.testing.assert_close(_mean(gx), gx_ref, atol=tol, rtol=0)
    plan = handle.plan
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        _run(model, inputs, w)  # the same shapes: the same plan, no second warning
    assert handle.plan is plan
    caught += again
    return {
        "sent": log.sent("forward") + log.sent("backward"),
        "predicted": handle.dry_run().total,
        "kinds": [(st.kind, st.module) for st in plan.stages],
        "plan": str(plan),
        "grads": n_grads,
        "warnings": [str(c.message) for c in caught if "dsp:" in str(c.message)],
    }


# ----------------------------------------------------------------------------- pipelines
def latte_pipeline():
    from diffusers import DDIMScheduler, LattePipeline

    model, _ = latte()
    vae = tiny.vae(torch.float64)
    pipe = LattePipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=model, scheduler=DDIMScheduler()
    )
    g = torch.Generator().manual_seed(4)
    call = {
        "negative_prompt": None,
        "prompt_embeds": torch.randn(1, 7, 16, generator=g, dtype=torch.float64),
        "negative_prompt_embeds": torch.randn(1, 7, 16, generator=g, dtype=torch.float64),
        "video_length": F,
        "height": 16,
        "width": 24,
        "num_inference_steps": 2,
        "output_type": "latent",
        "clean_caption": False,
        "mask_feature": False,
    }
    return pipe, call


def wan_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    model, _ = wan()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=model,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    g = torch.Generator().manual_seed(4)
    call = {
        "negative_prompt": None,
        "prompt_embeds": torch.randn(1, 7, 16, generator=g, dtype=torch.float64),
        "negative_prompt_embeds": torch.randn(1, 7, 16, generator=g, dtype=torch.float64),
        "num_frames": 4 * (F - 1) + 1,  # F latent frames
        "height": 64,
        "width": 48,
        "num_inference_steps": 2,
        "output_type": "latent",
    }
    return pipe, call


def animatediff_pipeline():
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    model, _ = animatediff()
    pipe = AnimateDiffPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=model,
        motion_adapter=None,
        scheduler=DDIMScheduler(),
    )
    g = torch.Generator().manual_seed(4)
    call = {
        "prompt_embeds": torch.randn(1, 7, 16, generator=g, dtype=torch.float64),
        "negative_prompt_embeds": torch.randn(1, 7, 16, generator=g, dtype=torch.float64),
        "num_frames": F,
        "height": 64,
        "width": 48,
        "num_inference_steps": 2,
        "output_type": "latent",
    }
    return pipe, call


PIPELINES = {"latte": latte_pipeline, "wan": wan_pipeline, "animatediff": animatediff_pipeline}


def pipeline_frames(name: str, strategy: str = "dsp", cfg: bool = False, from_disk=False):
    """``pipe(...)`` after ``parallelize(pipe)`` returns one process's frames on every rank
    (latents, scheduler steps and classifier-free guidance included). ``from_disk``: the
    pipeline is saved and loaded back with ``from_pretrained(path)`` first (local weights)."""
    pipe, call = PIPELINES[name]()
    if from_disk:
        import tempfile

        with tempfile.TemporaryDirectory() as path:
            pipe.save_pretrained(path)
            pipe = type(pipe).from_pretrained(path, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(**call, generator=torch.Generator().manual_seed(5)).frames
    handles = parallelize(pipe, strategy=strategy, cfg=cfg)
    with dsp.comm_log() as log:
        frames = pipe(**call, generator=torch.Generator().manual_seed(5)).frames
    torch.testing.assert_close(frames, ref, atol=1e-9, rtol=0)
    handle = next(iter(handles.handles.values()))
    return {
        "sent": log.sent("forward"),
        "shape": tuple(frames.shape),
        "plan": str(handle.plan),
        "ops": sorted({r.op for r in log.records}),
    }


# ----------------------------------------------------------------------------- bad input
class _Pipeline:
    """A pipeline-like object without a denoiser."""

    def __init__(self):
        self.vae = torch.nn.Linear(2, 2)
        self.components = {"vae": self.vae, "scheduler": object()}


def bad_inputs():
    """Each bad input's error on this rank, raised before any collective (no bytes sent)."""
    from dsp.parallelize import PlanError

    model, inputs = latte()
    fp8 = copy.deepcopy(model).to(torch.float8_e4m3fn)
    pipe, _ = latte_pipeline()
    cases = {
        "class": lambda: parallelize(torch.nn.Linear(2, 2)),
        "pipeline": lambda: parallelize(_Pipeline()),
        "dtype": lambda: parallelize(fp8),
        "strategy": lambda: parallelize(copy.deepcopy(model), strategy="megatron_sp"),
    }
    out = {}
    with dsp.comm_log() as log:
        for case, fn in cases.items():
            try:
                fn()
                out[case] = None
            except PlanError as e:
                out[case] = str(e)
        parallelize(pipe)
        try:
            parallelize(pipe.transformer)
            out["twice"] = None
        except PlanError as e:
            out["twice"] = str(e)
    out["sent"] = log.sent("forward") + log.sent("backward")
    return out


# ----------------------------------------------------------------------------- vs diffusers
def versus_diffusers(repeats: int = 3):
    """Wan under DSP's plan and under diffusers' own context parallelism (Ulysses degree N,
    ``enable_parallelism``) on the same model and inputs, forward (inference): both equal
    one process; bytes each sends to the other ranks; median forward time.

    What diffusers needed on CPU: ``torch.accelerator.device_count()`` patched to 1 while
    ``enable_parallelism`` runs (it takes ``rank % device_count()``, 0 without an
    accelerator); the DeviceMesh is then a CPU (gloo) one. Its bytes are counted by wrapping
    the functional collectives it calls (``all_to_all_single``, ``all_gather_tensor``)."""
    import statistics
    import time
    from unittest import mock

    import torch.distributed._functional_collectives as funcol
    from diffusers import ContextParallelConfig

    n, rank = dist.get_world_size(), dist.get_rank()
    model, (x, kw) = wan()
    theirs = copy.deepcopy(model)
    with torch.no_grad():
        (ref,) = copy.deepcopy(model)(x, **kw, return_dict=False)

    def timed(m):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                (out,) = m(x, **kw, return_dict=False)
            times.append(time.perf_counter() - t0)
        return out, statistics.median(times)

    parallelize(model)
    with torch.no_grad():
        model(x, **kw, return_dict=False)  # the first call plans
    with dsp.comm_log() as log:
        (ours,) = model(x, **kw, return_dict=False)
    ours_sent = log.sent("forward")
    _, ours_time = timed(model)

    with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
        theirs.enable_parallelism(config=ContextParallelConfig(ulysses_degree=n))
    sent = [0]
    a2a, ag = funcol.all_to_all_single, funcol.all_gather_tensor

    def all_to_all_single(t, output_split_sizes, input_split_sizes, group):
        splits = input_split_sizes or [1] * n  # None: even chunks
        kept = t.numel() * splits[rank] // sum(splits)
        sent[0] += (t.numel() - kept) * t.element_size()
        return a2a(t, output_split_sizes, input_split_sizes, group)

    def all_gather_tensor(t, gather_dim, group, *a, **k):
        sent[0] += t.numel() * t.element_size() * (n - 1)
        return ag(t, gather_dim, group, *a, **k)

    with mock.patch.object(funcol, "all_to_all_single", all_to_all_single):
        with mock.patch.object(funcol, "all_gather_tensor", all_gather_tensor):
            with torch.no_grad():
                (theirs_out,) = theirs(x, **kw, return_dict=False)
            theirs_sent = sent[0]
            _, theirs_time = timed(theirs)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(theirs_out, ref, atol=1e-9, rtol=0)
    return {"dsp": (ours_sent, ours_time), "diffusers": (theirs_sent, theirs_time)}


def diffusers_own(name: str):
    """What diffusers' own ``enable_parallelism`` (Ulysses, the whole group) says for
    ``name``: ``None`` if it applies, else its error."""
    from unittest import mock

    from diffusers import ContextParallelConfig

    model, _ = MODELS[name]()
    config = ContextParallelConfig(ulysses_degree=dist.get_world_size())
    try:
        with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
            model.enable_parallelism(config=config)
    except (ValueError, RuntimeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def planned_ahead_then_removed():
    """``example_inputs=`` (meta) plans at once; ``remove()`` leaves a single-device model."""
    model, (x, kw) = latte()
    with torch.no_grad():
        (ref,) = copy.deepcopy(model)(x, **kw, return_dict=False)
    meta = (x.to("meta"), {k: v.to("meta") for k, v in kw.items()})
    handle = parallelize(model, example_inputs=meta)
    planned = handle.plan
    with torch.no_grad(), dsp.comm_log() as log:
        (out,) = model(x, **kw, return_dict=False)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=0)
    handle.remove()
    with torch.no_grad(), dsp.comm_log() as after:
        (alone,) = model(x, **kw, return_dict=False)
    torch.testing.assert_close(alone, ref, atol=1e-9, rtol=0)
    return {
        "planned": planned is not None,
        "sent": log.sent("forward"),
        "after": after.sent("forward"),
        "attrs": sorted(k for k in ("_call_impl", "_dsp_parallel") if k in model.__dict__),
        "hooks": len(model._forward_pre_hooks) + len(model._forward_hooks),
    }
