"""Bytes per training step of diffusers' video models under DSP and Ulysses (or all-gather).

UNets (SVD, AnimateDiff) convolve over frames, so Ulysses, Ring and diffusers' own context
parallelism do not apply; their baseline is frame sharding that gathers every frame for
each temporal module (the planner's ``whole`` for each of them).

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


def svd(channels, layers: int, frames: int, h: int, w: int, device="cpu"):
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device(device):
        model = UNetSpatioTemporalConditionModel(
            block_out_channels=channels,
            down_block_types=("CrossAttnDownBlockSpatioTemporal",) * (len(channels) - 1)
            + ("DownBlockSpatioTemporal",),
            up_block_types=("UpBlockSpatioTemporal",)
            + ("CrossAttnUpBlockSpatioTemporal",) * (len(channels) - 1),
            layers_per_block=layers,
            num_attention_heads=tuple(c // 64 if c >= 320 else 2 for c in channels),
            cross_attention_dim=1024 if device == "meta" else 32,
            addition_time_embed_dim=256 if device == "meta" else 8,
            projection_class_embeddings_input_dim=768 if device == "meta" else 24,
            num_frames=frames,
        )
        x = torch.randn(2, frames, 8, h, w)
        image = torch.randn(2, 1, 1024 if device == "meta" else 32)
        ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)
    t = torch.tensor([3.0, 500.0], device=device)
    return model, (x, {"timestep": t, "encoder_hidden_states": image, "added_time_ids": ids})


def animatediff(channels, frames: int, h: int, w: int, device="cpu"):
    from diffusers import UNetMotionModel

    n = len(channels)
    with torch.device(device):
        model = UNetMotionModel(
            block_out_channels=channels,
            layers_per_block=2 if device == "meta" else 1,
            down_block_types=("CrossAttnDownBlockMotion",) * (n - 1) + ("DownBlockMotion",),
            up_block_types=("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * (n - 1),
            cross_attention_dim=768 if device == "meta" else 32,
            num_attention_heads=8 if device == "meta" else 2,
            motion_max_seq_length=32,
        )
        x = torch.randn(2, 4, frames, h, w)
        text = torch.randn(
            2 * frames, 77 if device == "meta" else 8, 768 if device == "meta" else 32
        )
    t = torch.tensor([3, 500], device=device)
    return model, (x, {"timestep": t, "encoder_hidden_states": text})


UNETS = ("svd", "animatediff")
#: The baseline of a UNet: every temporal module gathers the frames (``whole``).
WHOLE = {
    "svd": {
        "*.*.resnets.*.temporal_res_block": "whole",
        "*.resnets.*.temporal_res_block": "whole",
        "*.*.attentions.*": "whole",
        "*.attentions.*": "whole",
    },
    "animatediff": {"*.*.motion_modules.*": "whole", "*.motion_modules.*": "whole"},
}

SMALL = {
    "svd": lambda: svd((32, 64), 1, 8, 16, 16),  # 8 frames of 16 x 16 latents
    "animatediff": lambda: animatediff((32, 64), 8, 16, 16),
    "latte": lambda: latte(64, 4, 2, 16, 32),  # 16 frames x 16 x 16 patches
    "wan": lambda: wan(64, 4, 2, 9, 32, 32),  # 9 frames x 16 x 16 patches
}
RELEASED = {  # Latte-1 at 512 px, 16 frames; Wan 2.1 T2V 1.3B at 480 x 832, 81 frames;
    # SVD-XT at 576 x 1024, 25 frames; AnimateDiff (SD 1.5 + motion adapter) 512 px, 16 frames
    "svd": lambda: svd((320, 640, 1280, 1280), 2, 25, 72, 128, device="meta"),
    "animatediff": lambda: animatediff((320, 640, 1280, 1280), 16, 64, 64, device="meta"),
    "latte": lambda: latte(1152, 16, 28, 16, 64, device="meta"),
    "wan": lambda: wan(1536, 12, 30, 21, 60, 104, device="meta"),
}


def measure(name: str, strategy: str):
    """One training step's bytes on this rank, and the dry run's total (for a UNet, the
    second figure is the all-gather baseline's dry run on the same recording)."""
    model, (x, kw) = SMALL[name]()
    handle = parallelize(model, strategy=strategy)
    with dsp.comm_log() as log:
        (out,) = model(x.requires_grad_(), **kw, return_dict=False)
        out.square().mean().backward()
    sent = log.sent("forward") + log.sent("backward")
    if name in UNETS:
        n = torch.distributed.get_world_size()
        whole = handle.recording.plan(n, overrides=WHOLE[name])
        return sent, handle.dry_run().total, handle.recording.cost(whole, n).total
    return sent, handle.dry_run().total


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
    elif strategy == "whole":
        plan = rec.plan(n, overrides=WHOLE[name])
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
    print()
    print(
        "| UNet | N | measured MiB/step dsp | all-gather (dry run) | dsp/all-gather | "
        "released size, dry run GiB/step dsp | all-gather | dsp/all-gather |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in UNETS:
        results = spawn(measure, n, name, "dsp")
        sent = sum(r[0] for r in results)
        assert sent == results[0][1], (name, sent, results[0][1])
        small_whole = results[0][2]
        big, big_whole = dry_run(name, "dsp", n), dry_run(name, "whole", n)
        print(
            f"| {name} | {n} | {sent / 2**20:.2f} | {small_whole / 2**20:.2f} | "
            f"{sent / small_whole:.3f} | {big / 2**30:.2f} | {big_whole / 2**30:.2f} | "
            f"{big / big_whole:.3f} |"
        )


if __name__ == "__main__":
    main()
