"""One prepared run of dsp's CUDA path on a single GPU: what a lent GPU machine can verify in
a few minutes, as one command, with every figure written down.

Each check runs on its own (one failing does not stop the others) and records what it saw:

* ``env``: torch, CUDA, the device, NCCL, the SDPA backends torch enables.
* ``matmul``: achieved bf16 FLOP/s of a large matrix product, against the H100 figures the
  planner and the simulator assume (``dsp.sim.hardware``).
* ``model_step``: stdit's forward and backward on the device under bf16 autocast (SDPA's
  flash kernels) against the same weights and inputs in fp32 on the CPU: loss, gradients,
  step time.
* ``ring_block``: one ring-attention block, and four merged by their log-sum-exps as
  ``ring_attention`` merges them (``dsp.attention.ring``'s einsum path, used off the CPU),
  against ``scaled_dot_product_attention``: the errors, and the time of a block and of SDPA.
* ``pack_unpack``: the switch's copies against a plain copy on the device
  (``benchmarks/pack_unpack.py``'s cases, fewer rounds).
* ``two_ranks_gloo``: DSP on two ranks sharing the device over gloo, which stages CUDA
  tensors through the host: the engine, the switches overlapped in 2 slices and their device
  buffers, fp64 outputs and gradients against one process, bytes against the dry run.
* ``cli_train``, ``cli_sample``: ``dsp train`` (STDiT-XL/2 at 16 x 256 x 256 pixels, 20 steps:
  the single-GPU figure docs/training.md asks for) and ``dsp sample`` on the device, one
  process (the models, losses, autocast and sampler on CUDA; no strategy runs at one rank).

NCCL itself (its all-to-all, its stream) needs two GPUs: it refuses two ranks on one device.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out "$OUT"        # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gc  # the same checks on CPU

It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _on_path(folder: str) -> None:
    """Make ``folder``'s modules importable (once: the checks may run many times in-process)."""
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_time(fn: Callable[[], object], device: str, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_env(args) -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    if args.device.startswith("cuda"):
        p, nccl = torch.cuda.get_device_properties(args.device), torch.cuda.nccl.version()
        out.update(
            device=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
            bf16=torch.cuda.is_bf16_supported(),
            sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
            sdpa_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
        )
    else:
        out["device"] = "cpu"
    return out


def check_matmul(args) -> dict:
    from dsp.sim.hardware import GPUS

    n = 512 if args.quick else 8192
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=args.device, dtype=dtype)
    b = torch.randn(n, n, device=args.device, dtype=dtype)
    t = _median_time(lambda: a @ b, args.device, repeats=10, warmup=3)
    h100 = GPUS["h100"]
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "tflops": 2 * n**3 / t / 1e12,
        "h100_peak_tflops_assumed": h100.peak_flops / 1e12,
        "h100_achieved_tflops_assumed": h100.flops / 1e12,
    }


def _stdit(args):
    from dsp.models import build_model

    torch.manual_seed(0)
    overrides = {} if args.quick else {"hidden_size": 256, "num_heads": 8, "depth": 2}
    model = build_model("stdit-tiny", zero_init=False, **overrides)
    frames, side = (4, 8) if args.quick else (16, 32)
    x = torch.randn(1, model.config.in_channels, frames, side, side)
    t = torch.tensor([3])
    y = torch.randn(1, 16, model.config.caption_channels)
    return model, (x, t, y)


def check_model_step(args) -> dict:
    model, inputs = _stdit(args)
    ref = [p.detach().clone() for p in model.parameters()]

    def step(m, xs, autocast):
        m.zero_grad()
        with torch.autocast(xs[0].device.type, dtype=torch.bfloat16, enabled=autocast):
            out = m(*xs)
        loss = out.float().square().mean()
        loss.backward()
        return loss

    def loss_and_grads(m, xs, autocast):
        loss = step(m, xs, autocast)
        return loss.item(), [p.grad.detach().float().cpu().reshape(-1) for p in m.parameters()]

    loss_cpu, grads_cpu = loss_and_grads(model, inputs, autocast=False)
    dev = model.to(args.device)
    xs = tuple(x.to(args.device) for x in inputs)
    autocast = args.device.startswith("cuda")
    loss_dev, grads_dev = loss_and_grads(dev, xs, autocast)
    g_cpu, g_dev = torch.cat(grads_cpu), torch.cat(grads_dev)
    cos = torch.nn.functional.cosine_similarity(g_cpu, g_dev, dim=0).item()
    step_s = _median_time(lambda: step(dev, xs, autocast), args.device, repeats=5)
    for p, r in zip(model.parameters(), ref):  # nothing updated the weights
        assert torch.equal(p.detach().cpu(), r)
    rel = abs(loss_dev - loss_cpu) / max(abs(loss_cpu), 1e-12)
    ok = rel < (5e-2 if autocast else 1e-5) and cos > (0.99 if autocast else 0.99999)
    return {
        "input": list(inputs[0].shape),
        "autocast_bf16": autocast,
        "loss_cpu_fp32": loss_cpu,
        "loss_device": loss_dev,
        "loss_rel_diff": rel,
        "grad_cosine": cos,
        "step_s": step_s,
        "ok": ok,
    }


def check_ring_block(args) -> dict:
    """One ring block, and a ring of 4 blocks merged by their log-sum-exps (what
    ``ring_attention`` computes across 4 ranks, in fp32 as it does), against SDPA over the
    whole sequence in fp32; errors relative to the largest output. A block's time is set
    against SDPA on the inputs' own dtype (bf16 on a GPU: its flash kernel)."""
    from dsp.attention.ring import _block_forward, _fused, _merge

    b, length, h, d = (1, 256, 4, 32) if args.quick else (1, 4096, 16, 64)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    q, k, v = (torch.randn(b, length, h, d, device=args.device, dtype=dtype) for _ in range(3))
    scale = d**-0.5
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2).float() for x in (q, k, v)), scale=scale
    ).transpose(1, 2)
    size = ref.abs().max().item()
    qa, ka, va = (x.float() for x in (q, k, v))  # ring_attention's blocks run in fp32
    out, lse = _block_forward(qa, ka, va, scale)
    merged = merged_lse = None
    for kb, vb in zip(ka.chunk(4, dim=1), va.chunk(4, dim=1)):
        merged, merged_lse = _merge(merged, merged_lse, *_block_forward(qa, kb, vb, scale))
    err = (out.float() - ref).abs().max().item() / size
    err_ring = (merged.float() - ref).abs().max().item() / size
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    )
    t_block = _median_time(lambda: _block_forward(qa, ka, va, scale), args.device, repeats=10)
    t_sdpa = _median_time(sdpa, args.device, repeats=10)
    tol = 1e-3  # both sides in fp32 from the same inputs
    return {
        "shape_BLHD": [b, length, h, d],
        "dtype": str(dtype).replace("torch.", ""),
        "fused_cpu_kernel": _fused(qa),
        "max_err_one_block_rel": err,
        "max_err_ring_of_4_rel": err_ring,
        "block_s": t_block,
        "sdpa_s": t_sdpa,
        "block_over_sdpa": t_block / t_sdpa,
        "ok": max(err, err_ring) < tol and bool(torch.isfinite(merged_lse).all()),
    }


def check_pack_unpack(args) -> dict:
    _on_path(HERE)
    import pack_unpack as pu

    before = torch.get_default_dtype()
    torch.set_default_device(args.device)
    torch.set_default_dtype(torch.bfloat16 if args.device.startswith("cuda") else before)
    try:
        shapes = [(1, 256, 4, 16)] if args.quick else pu.SHAPES[:2]
        rows = pu.run(5 if args.quick else 51, shapes, [2], [] if args.quick else pu.DSP_SHAPES[:1])
        sweep = pu.sweep(5 if args.quick else 51, [(1, 512)] if args.quick else pu.SWEEP)
    finally:
        torch.set_default_device("cpu")
        torch.set_default_dtype(before)
    return {"rows": rows, "sweep": sweep, "summary": pu.summary(rows)}


def _two_rank_body(device: str, quick: bool) -> dict:
    """One rank: stdit in fp64 on ``device``, parallelized by DSP's planner with its switches
    overlapped in 2 slices, against one process on the same device (outputs, parameter and
    input gradients), and the bytes sent against the dry run."""
    import copy

    import torch.distributed as dist

    import dsp
    import dsp.parallelize as P
    from dsp.models import build_model

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device).index or 0)  # both ranks on one GPU
    torch.manual_seed(0)
    model = build_model("stdit-tiny", zero_init=False).double().to(device)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    t, side = (5, 6) if quick else (9, 14)  # uneven over 2 ranks
    c = model.config
    x = torch.randn(2, c.in_channels, t, side, side + 4, generator=g, dtype=torch.float64)
    y = torch.randn(2, 6, c.caption_channels, generator=g, dtype=torch.float64)
    inputs = (x.to(device), torch.tensor([3, 500], device=device), y.to(device))

    def run(m):
        xs = (inputs[0].clone().requires_grad_(), *inputs[1:])
        out = m(*xs)
        (out * torch.linspace(-1, 1, out.numel(), device=device).view(out.shape)).sum().backward()
        return out, xs[0].grad

    out_ref, gx_ref = run(ref)
    rec = P.record(model, inputs)
    plan = rec.plan(dist.get_world_size(), chunks=2)
    handle = dsp.parallelize(model, plan)
    with dsp.comm_log() as log:
        out, gx = run(model)
    handle.sync_grads()
    handle.remove()
    dist.all_reduce(gx)  # the ranks' input gradients, averaged as the test suite does
    gx /= dist.get_world_size()
    ref_grads = dict(ref.named_parameters())
    grad_err = max(
        (p.grad - ref_grads[name].grad).abs().max().item() for name, p in model.named_parameters()
    )
    predicted = rec.cost(plan, dist.get_world_size())

    # the same plan in fp32 under bf16 autocast (switches move bf16): against one process
    lp, lp_ref = copy.deepcopy(ref).float(), copy.deepcopy(ref).float()
    x32 = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    handle = dsp.parallelize(lp, P.record(lp, x32).plan(dist.get_world_size(), chunks=2))
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        low, low_ref = lp(*x32).float(), lp_ref(*x32).float()
    handle.remove()
    return {
        "bf16_out_rel_err": ((low - low_ref).abs().max() / low_ref.abs().max()).item(),
        "device": str(out.device),
        "sliced_stages": sum(1 for st in plan.stages if st.chunks),
        "out_err": (out - out_ref).abs().max().item(),
        "param_grad_err": grad_err,
        "input_grad_err": (gx - gx_ref).abs().max().item(),
        "sent": log.sent("forward") + log.sent("backward"),
        "predicted_all_ranks": predicted.total_forward + predicted.total_backward,
    }


def check_two_ranks_gloo(args) -> dict:
    """DSP on two ranks sharing the device over gloo (it stages CUDA tensors through the
    host; NCCL refuses two ranks on one GPU): the engine, the overlapped switches and their
    CUDA buffers, exact in fp64 against one process."""
    from dsp.launch import spawn

    ranks = spawn(_two_rank_body, 2, args.device, args.quick)
    worst = max(max(r["out_err"], r["param_grad_err"], r["input_grad_err"]) for r in ranks)
    sent = sum(r["sent"] for r in ranks)
    return {
        "ranks": ranks,
        "max_err": worst,
        "sent_bytes": sent,
        "bf16_out_rel_err": max(r["bf16_out_rel_err"] for r in ranks),
        "ok": worst < 1e-9
        and sent == ranks[0]["predicted_all_ranks"]
        and ranks[0]["sliced_stages"] > 0
        and max(r["bf16_out_rel_err"] for r in ranks) < 5e-2,
    }


def _cli(args, *argv: str, timeout: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "dsp", *argv, "--device", args.device.split(":")[0]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return {
        "command": " ".join(cmd[1:]),
        "rc": proc.returncode,
        "wall_s": time.perf_counter() - t0,
        "tail": (proc.stdout + proc.stderr)[-1500:],
        "ok": proc.returncode == 0,
    }


#: the single-GPU training figure docs/training.md asks for: STDiT-XL/2, 16 x 256 x 256 pixels
#: (activation checkpointing: 2 x 65,536 tokens through 28 blocks might not fit otherwise)
TRAIN_XL = ["--model", "stdit-xl/2", "--frames", "16", "--height", "256", "--width", "256",
            "--global-batch", "2", "--steps", "20", "--activation-checkpointing"]  # fmt: skip


def check_cli_train(args) -> dict:
    """``dsp train`` on the device: the documented STDiT-XL/2 recipe (tiny with --quick), its
    losses and tokens per second from ``--log-json``."""
    log = os.path.join(args.out, "train.json")
    recipe = ["--steps", "3"] if args.quick else TRAIN_XL
    r = _cli(args, "train", *recipe, "--no-progress", "--log-json", log, timeout=420)
    if r["ok"]:
        with open(log) as f:
            summary = json.load(f)
        losses = summary["losses"]
        r.update(
            first_loss=losses[0],
            last_loss=losses[-1],
            tokens_per_s=summary["tokens_per_s"],
            median_step_s=statistics.median(summary["step_times"]),
            precision=summary["layout"]["precision"],
        )
        r["ok"] = all(map(math.isfinite, losses))
    return r


def check_cli_sample(args) -> dict:
    out = os.path.join(args.out, "sample.gif")
    return _cli(args, "sample", "--steps", "4", "--out", out, timeout=300)


CHECKS: Dict[str, Callable] = {
    "env": check_env,
    "matmul": check_matmul,
    "model_step": check_model_step,
    "ring_block": check_ring_block,
    "pack_unpack": check_pack_unpack,
    "two_ranks_gloo": check_two_ranks_gloo,
    "cli_train": check_cli_train,
    "cli_sample": check_cli_sample,
}


def markdown(results: dict) -> str:
    lines = ["# dsp on one GPU: the CUDA path, checked", ""]
    for name, r in results.items():
        status = "ok" if r.get("ok", True) and "error" not in r else "FAILED"
        lines.append(f"## {name}: {status} ({r.get('check_s', 0):.1f} s)")
        lines.append("")
        if "error" in r:
            lines += ["```", r["error"], "```", ""]
            continue
        if name == "pack_unpack":
            lines += r["summary"] + [""]
            continue
        for k, v in r.items():
            if k in ("check_s", "ok"):
                continue
            if k == "tail":
                lines += ["```", str(v).strip(), "```"]
            else:
                lines.append(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}")
        lines.append("")
    return "\n".join(lines)


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and .md")
    p.add_argument("--only", default=None, help="comma-separated checks: " + ",".join(CHECKS))
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        p.error(f"--only: unknown checks {unknown}; choose from {list(CHECKS)}")
    os.makedirs(args.out, exist_ok=True)
    _on_path(os.path.join(ROOT, "src"))
    results = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            r = CHECKS[name](args)
        except Exception:  # noqa: BLE001 - recorded; the other checks still run
            r = {"error": traceback.format_exc(limit=4), "ok": False}
        r["check_s"] = time.perf_counter() - t0
        results[name] = r
        print(
            f"{name}: {'ok' if r.get('ok', True) else 'FAILED'} ({r['check_s']:.1f} s)", flush=True
        )
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:  # after every check
            json.dump(results, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(markdown(results))
    return 0 if all(r.get("ok", True) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
