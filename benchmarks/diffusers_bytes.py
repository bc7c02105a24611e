"""Bytes per training step of diffusers' video models under DSP and Ulysses.

Measured: one forward + backward of a small config on N CPU ranks (gloo), bytes counted by
``dsp.comm_log()`` summed over ranks, fp32 (the dry run is asserted equal). Dry run: the
same plans at the released models' sizes, recorded on the meta device (no memory, no
compute; the dry run equals the measured bytes to the byte, tests/integrations).

    python benchmarks/diffusers_bytes.py [--world-size 4]
"""

from __future__ import annotations

import argparse

import torch

import dsp
from dsp.integrations.diffusers import parallelize
from dsp.launch import spawn


def latte(hidden: int, heads: int, layers: int, frames: int, size: int, device="cpu"):
    from diffusers import LatteTransformer3DModel

    with torch.device(device):
        model = LatteTransformer3DModel(
            num_attention_heads=heads,
            attention_head_dim=hidden // heads,
            in_channels=4,
            out_channels=8,
            num_layers=layers,
            sample_size=size,
            patch_size=2,
            video_length=frames,
            caption_channels=64 if device == "cpu" else 4096,
            cross_attention_dim=hidden,
        )
        x = torch.randn(2, 4, frames, size, size)
        text = torch.randn(2, 16 if device == "cpu" else 120, 64 if device == "cpu" else 4096)
    t = torch.tensor([3, 500], device=device)
    return model, (x, {"timestep": t, "encoder_hidden_states": text})


def wan(hidden: int, heads: int, layers: int, frames: int, h: int, w: int, device="cpu"):
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=hidden // heads,
            in_channels=16,
            out_channels=16,
            text_dim=64 if device == "cpu" else 4096,
            freq_dim=256,
            ffn_dim=4 * hidden,
            num_layers=layers,
        )
        x = torch.randn(2, 16, frames, h, w)
        text = torch.randn(2, 16 if device == "cpu" else 512, 64 if device == "cpu" else 4096)
    t = torch.tensor([3, 500], device=device)
    return model, (x, {"timestep": t, "encoder_hidden_states": text})


SMALL = {
    "latte": lambda: latte(64, 4, 2, 16, 32),  # 16 frames x 16 x 16 patches
    "wan": lambda: wan(64, 4, 2, 9, 32, 32),  # 9 frames x 16 x 16 patches
}
RELEASED = {  # Latte-1 at 512 px, 16 frames; Wan 2.1 T2V 1.3B at 480 x 832, 81 frames
    "latte": lambda: latte(1152, 16, 28, 16, 64, device="meta"),
    "wan": lambda: wan(1536, 12, 30, 21, 60, 104, device="meta"),
}


def measure(name: str, strategy: str):
    """One training step's bytes on this rank, and the dry run's total."""
    model, (x, kw) = SMALL[name]()
    handle = parallelize(model, strategy=strategy)
    with dsp.comm_log() as log:
        (out,) = model(x.requires_grad_(), **kw, return_dict=False)
        out.square().mean().backward()
    return log.sent("forward") + log.sent("backward"), handle.dry_run().total


def dry_run(name: str, strategy: str, n: int) -> int:
    """The bytes of ``strategy``'s plan for the released size (meta device, one process)."""
    import dsp.parallelize as P
    from dsp.integrations.diffusers import declarations
    from dsp.strategies.plans import attention_plan

    model, (x, kw) = RELEASED[name]()
    streams, declare = declarations(model)
    example = (x.requires_grad_(), {**kw, "return_dict": False})
    with torch.device("meta"):  # tensors the forward creates (timestep tables) too
        rec = P.record(model, example, streams=streams, declare=declare)
    if strategy == "dsp":
        plan = rec.plan(n)
    else:
        kind = {"ulysses": "heads", "ring": "ring"}[strategy]
        with torch.device("meta"):
            plan = attention_plan(
                model, kind, example_inputs=example, streams=streams, declare=declare
            )
    return rec.cost(plan, n).total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    n = parser.parse_args().world_size
    rows = []
    for name in ("latte", "wan"):
        got = {}
        for strategy in ("dsp", "ulysses"):
            results = spawn(measure, n, name, strategy)
            sent = sum(r[0] for r in results)
            assert sent == results[0][1], (name, strategy, sent, results[0][1])
            big = dry_run(name, strategy, n)
            got[strategy] = (sent, big)
        rows.append((name, got))
    print(
        "| model | N | measured MiB/step dsp | ulysses | dsp/ulysses | released size, dry run "
        "GiB/step dsp | ulysses | dsp/ulysses |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, got in rows:
        (ds, db), (us, ub) = got["dsp"], got["ulysses"]
        print(
            f"| {name} | {n} | {ds / 2**20:.2f} | {us / 2**20:.2f} | {ds / us:.3f} | "
            f"{db / 2**30:.2f} | {ub / 2**30:.2f} | {db / ub:.3f} |"
        )


if __name__ == "__main__":
    main()
