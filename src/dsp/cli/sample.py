"""``dsp sample``: sample videos with classifier-free guidance, CFG-parallel x DSP.

Rectified-flow Euler steps from noise to video. With --cfg-parallel the conditional and the
unconditional passes run on two halves of the ranks at once (one all-gather per step joins
them); each half shards its pass with DSP. Writes the video (GIF or MP4) and prints a
latency table; the video equals single-process sampling (fp32).

With --diffusers PATH it runs a saved diffusers pipeline instead (a local directory, as
pipe.save_pretrained writes it; its transformer or unet one of the classes dsp declares:
LatteTransformer3DModel, WanTransformer3DModel, UNetMotionModel): every rank runs the
pipeline with its denoiser under dsp.integrations.diffusers.parallelize (--cfg-parallel:
the unconditional and conditional halves of each call on two halves of the ranks), and
rank 0 writes the frames. The text is --prompt (the pipeline's text encoder) or
--prompt-embeds FILE.pt (torch.save of a (B, L, C) tensor, or of a dict of pipeline inputs;
with --negative-prompt-embeds FILE.pt for classifier-free guidance without a text encoder).

With --link ib (or nvlink, or a RATE such as 25MB/s) the spawned ranks talk over an emulated
interconnect instead of loopback: each rank in its own network namespace behind a
rate-limited veth (root and iproute2 needed), the rate calibrated exactly as `dsp bench
--mode infer --link ib` calibrates it for the same model and latent size: DSP's
communication:compute time ratio on this CPU equals the one `dsp simulate` predicts for
STDiT-XL/2 (64 frames x 64x64 tokens, bf16, H100s at their achieved FLOP/s) over NDR
InfiniBand (ib, 50 GB/s per GPU) or NVLink 4 (nvlink, 450 GB/s per GPU) on the same N.
The latency table then stands for that cluster's; the video is unchanged.

Examples:
  dsp sample --checkpoint ckpt --steps 10 --cfg-scale 4 --out video.gif
  dsp sample --set hidden_size=256 --set num_heads=8 --frames 16 --height 64 --width 64 \\
      --world-size 2 --strategy ulysses --link ib --out video.gif   # random model, emulated IB
  dsp sample --checkpoint ckpt --world-size 4 --cfg-parallel --out video.gif   # 2 x sp 2
  torchrun --nproc-per-node 4 --no-python dsp sample --checkpoint ckpt --cfg-parallel
  dsp sample --diffusers path/to/latte --world-size 2 --prompt-embeds emb.pt \\
      --negative-prompt-embeds neg.pt --frames 16 --steps 25 --out latte.gif
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from pathlib import Path

from dsp.cli.errors import CommandError, add_job_flags, apply_timeout
from dsp.cli.lists import chunk_count
from dsp.cli.table import human_bytes, print_table
from dsp.cli.train import add_set_flag, run_job, set_threads, under_torchrun
from dsp.strategies import overlap_options

#: ``--link`` values that mean the plain loopback network (``none`` is ``dsp bench``'s word).
LOOPBACK = ("loopback", "none")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="sample videos with CFG, cond/uncond on two rank groups, DSP on each",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", default=None, help="checkpoint dir of `dsp train` (or its root)")
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="'<colour> <shape> <motion>', repeatable (default 'red circle left'); "
        "--diffusers: text for the pipeline's own text encoder",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Euler steps (default 10; --diffusers: the pipeline's num_inference_steps)",
    )
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="guidance scale (default 4; --diffusers: the pipeline's guidance_scale)",
    )
    p.add_argument("--cfg-parallel", action="store_true", help="cond and uncond on two halves")
    p.add_argument("--world-size", type=int, default=None, help="local ranks to spawn")
    p.add_argument("--strategy", default="dsp", help="sequence parallelism (default dsp)")
    p.add_argument(
        "--plan",
        default="auto",
        help="dsp's plan: auto (the planner, for these shapes), hand or a plan JSON file",
    )
    p.add_argument(
        "--chunks",
        type=chunk_count,
        default=None,
        help="dsp: run each compute stage that can in k overlapped slices (its switches run "
        "while another slice computes); auto: the planner chooses per stage from predicted "
        "time on --cluster, or with --link on the emulated link as measured (default 1)",
    )
    p.add_argument(
        "--cluster",
        default=None,
        help="the machine --chunks auto plans for: a preset (8xh100-nvlink, 2x8xh100-ib) or a "
        "JSON file (dsp simulate's)",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per rank (spawned ranks: 1)"
    )
    p.add_argument("--model", default="stdit-tiny", help="random model without --checkpoint")
    add_set_flag(p, "random model config override, repeatable (e.g. --set hidden_size=256)")
    p.add_argument(
        "--link",
        default="loopback",
        help="loopback (default; also: none) | ib | nvlink | RATE (e.g. 25MB/s, 200mbit): the "
        "spawned ranks' network, as dsp bench --link; ib and nvlink: emulated and calibrated "
        "like dsp bench --mode infer for this model and size, so that DSP's "
        "communication:compute time ratio is STDiT-XL/2's on H100s over that link (same N); "
        "needs root and iproute2",
    )
    p.add_argument(
        "--out", default="video.gif", help="video path, .gif or .mp4 (default video.gif)"
    )
    p.add_argument("--fps", type=float, default=8.0, help="frames per second (default 8)")
    p.add_argument("--scale", type=int, default=None, help="pixel upscaling (default: to 128 px)")
    p.add_argument(
        "--save-tensor",
        default=None,
        help="also save latents and video (torch.save; --diffusers: the frames)",
    )
    p.add_argument("--json", default=None, help="write the latency table as JSON")
    g = p.add_argument_group("diffusers pipelines (--diffusers PATH)")
    g.add_argument("--diffusers", metavar="PATH", default=None, help="a saved pipeline directory")
    g.add_argument(
        "--prompt-embeds",
        metavar="FILE",
        default=None,
        help="torch.save'd prompt embeddings (B, L, C), or a dict of pipeline inputs",
    )
    g.add_argument(
        "--negative-prompt-embeds",
        metavar="FILE",
        default=None,
        help="torch.save'd negative prompt embeddings (guidance without a text encoder)",
    )
    g.add_argument(
        "--frames",
        type=int,
        default=None,
        help="frames (default: the pipeline's; a random --model: 8)",
    )
    g.add_argument(
        "--height", type=int, default=None, help="pixels (default: the pipeline's; random: 16)"
    )
    g.add_argument(
        "--width", type=int, default=None, help="pixels (default: the pipeline's; random: 16)"
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "float64", "float16", "bfloat16"),
        default="float32",
        help="the dtype of from_pretrained (default float32)",
    )
    g.add_argument(
        "--output-type",
        choices=("pt", "latent"),
        default="pt",
        help="pt: decoded frames, written to --out; latent: latents only (--save-tensor)",
    )
    add_job_flags(p, timeout=300, what="sampling")
    p.set_defaults(func=run)


def _sample_rank(cfg):
    from dsp.sample import sample

    return sample(cfg)


def run(args) -> int:
    from dsp.data import parse_prompt
    from dsp.sample import SampleConfig

    apply_timeout(args)
    set_threads(args.threads)
    if args.diffusers:
        if args.link not in LOOPBACK or args.overrides:
            flag = "--set" if args.overrides else f"--link {args.link}"
            raise ValueError(f"{flag}: for dsp's own models, not --diffusers pipelines")
        return run_diffusers(args)
    given = [f for f in DIFFUSERS_FLAGS if getattr(args, f) not in (None, "float32", "pt")]
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise ValueError(f"{flags}: for --diffusers PATH only")
    sizes = {
        f: getattr(args, f) for f in ("frames", "height", "width") if getattr(args, f) is not None
    }
    if args.checkpoint and (sizes or args.overrides):
        flags = ", ".join([f"--{f}" for f in sizes] + ["--set"] * bool(args.overrides))
        raise ValueError(f"{flags}: the checkpoint fixes the model and the video size")
    cfg = SampleConfig(
        checkpoint=args.checkpoint,
        model=args.model,
        model_overrides=dict(args.overrides),
        **sizes,
        prompts=args.prompt or ["red circle left"],
        steps=args.steps or 10,
        cfg_scale=4.0 if args.cfg_scale is None else args.cfg_scale,
        cfg_parallel=args.cfg_parallel,
        strategy=args.strategy,
        plan=args.plan,
        chunks=args.chunks,
        cluster=args.cluster,
        seed=args.seed,
        precision=args.precision,
        device=args.device,
    )
    for prompt in cfg.prompts:
        parse_prompt(prompt)  # fail before starting any rank
    world = _world(args)
    check_sizes(cfg, world)
    link = check_link(args, cfg, world)
    measured = cfg.chunks == "auto" and cfg.cluster is None and link is not None
    cluster = {} if measured else cfg.cluster  # {}: the link's, once measured (below)
    overlap_options(cfg.strategy, cfg.chunks, cluster, training=False)  # before any rank
    try:
        if link is None:
            result, link_info = run_job(_sample_rank, cfg, world, args), None
        else:
            result, link_info = run_on_link(cfg, world, link, threads=args.threads or 1)
    except KeyboardInterrupt:
        raise CommandError("interrupted; nothing was written", 130) from None
    if result is None:
        return 0
    report(result, args, link_info)
    return 0


DIFFUSERS_FLAGS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "dtype",
    "output_type",
)


def check_link(args, cfg, world: int):
    """``--link``: ``None`` for loopback, else the link to emulate (``ib``, ``nvlink`` or a
    rate), after checking that it can be built here: local ranks, network namespaces."""
    from dsp.bench.calibrate import TARGETS, parse_rate

    link = args.link
    if link in LOOPBACK:
        return None
    if link not in TARGETS:
        try:
            parse_rate(link)
        except ValueError as e:
            raise ValueError(
                f"--link {link!r}: expected loopback, {', '.join(TARGETS)} or a rate such as "
                f"25MB/s or 200mbit ({e})"
            ) from None
    if under_torchrun():
        raise ValueError(
            f"--link {link}: emulates the network between ranks this command spawns; torchrun's "
            "processes use the network they have"
        )
    if world < 2:
        raise ValueError(f"--link {link}: needs --world-size >= 2 (one process sends nothing)")
    if args.device == "cuda":
        raise ValueError(f"--link {link}: the emulated link joins CPU ranks (gloo)")
    sample_workload(cfg, world)  # a model the calibration can size, before any rank starts
    return link


def sample_workload(cfg, world: int):
    """The :class:`~dsp.bench.runner.BenchConfig` that ``dsp bench --mode infer`` would run for
    ``cfg``'s model and latent size on ``world`` ranks: what ``--link`` is calibrated for.

    One guided step is two forwards of batch ``len(cfg.prompts)`` (cond, uncond), each the
    bench's inference step, so the bench's communication:compute ratio is the sampler's.
    """
    from dsp.bench.runner import BenchConfig
    from dsp.data import PatchCodec

    if cfg.checkpoint:
        from dsp.train.checkpoint import read_meta

        tcfg = read_meta(cfg.checkpoint)["config"]
        model, over = tcfg["model"], dict(tcfg.get("model_overrides") or {})
        frames, height, width, factor = (tcfg[k] for k in ("frames", "height", "width",
                                                           "codec_factor"))  # fmt: skip
    else:
        model, over = cfg.model, dict(cfg.model_overrides)
        frames, height, width, factor = cfg.frames, cfg.height, cfg.width, 2
    sizes = {"depth": "depth", "hidden_size": "hidden", "num_heads": "heads"}
    other = sorted(set(over) - set(sizes) - {"zero_init", "in_channels", "learn_sigma"})
    if model.startswith("diffusers:") or other:
        what = f"model {model}" if model.startswith("diffusers:") else f"overrides {other}"
        raise ValueError(
            f"--link: the calibration sizes a dsp.models model by depth, hidden_size and "
            f"num_heads (as dsp bench does); it cannot stand for {what}"
        )
    _, t, h, w = PatchCodec(factor).latent_shape(frames, height, width)
    return BenchConfig(
        model=model,
        strategy="dsp",
        world_size=world,
        frames=t,
        height=h,
        width=w,
        batch=len(cfg.prompts),
        mode="infer",
        **{sizes[k]: v for k, v in over.items() if k in sizes},
    )


@contextlib.contextmanager
def sampling_link(cfg, world: int, link: str, *, threads: int = 1, timeout=None):
    """A :class:`~dsp.bench.calibrate.Calibration` whose ``pool`` has ``world`` ranks on the
    emulated ``link``, calibrated as ``dsp bench --mode infer --link`` for ``cfg``'s size.

    Raises :class:`CommandError` naming why when network namespaces are not available (the
    bench falls back to loopback; a sampling run asked for a link gets the link or nothing).
    """
    from dsp.bench.calibrate import calibrated_link
    from dsp.bench.link import netns_available
    from dsp.mesh import default_timeout

    ok, why = netns_available()
    if not ok:
        raise CommandError(
            f"--link {link}: cannot emulate a link here: {why} (use --link loopback)", 2
        )
    timeout = timeout or default_timeout().total_seconds()
    with calibrated_link(
        world, link, workload=sample_workload(cfg, world), threads=threads, timeout=timeout
    ) as cal:
        yield cal


def link_meta(cal) -> dict:
    """What a report says about the link: the calibration, as ``dsp bench`` records it."""
    return cal.meta()


def run_on_link(cfg, world: int, link: str, *, threads: int = 1):
    """Rank 0's :class:`~dsp.sample.SampleResult` of ``cfg`` on ``world`` ranks over the
    emulated ``link``, and the link's :func:`link_meta`."""
    with sampling_link(cfg, world, link, threads=threads) as cal:
        meta = link_meta(cal)
        if cfg.chunks == "auto" and cfg.cluster is None:  # plan for the link as measured
            from dsp.bench.sweep import bench_timing_cluster

            cfg = dataclasses.replace(cfg, cluster=bench_timing_cluster(meta, world))
        return cal.pool.run(_sample_rank, cfg)[0], meta


def _sample_diffusers_rank(cfg):
    from dsp.sample.diffusers import sample_diffusers

    return sample_diffusers(cfg)


def _world(args) -> int:
    """Ranks: torchrun's, else ``--world-size`` (checked against the machine)."""
    from dsp.watchdog import check_local_world

    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if args.world_size is not None and args.world_size != world:
            raise ValueError(f"--world-size {args.world_size} but torchrun started {world}")
        return world
    world = args.world_size or (2 if args.cfg_parallel else 1)
    check_local_world(world, force=args.force)
    if args.cfg_parallel and world % 2:
        raise ValueError(
            f"--cfg-parallel needs an even --world-size (cond and uncond halves), got {world}"
        )
    return world


def run_diffusers(args) -> int:
    """``dsp sample --diffusers PATH``: check the directory and flags, run the pipeline on
    the ranks, write rank 0's frames."""
    from dsp.sample.diffusers import DiffusersSampleConfig, check_pipeline

    if args.checkpoint:
        raise ValueError("--checkpoint and --diffusers: give one (a dsp checkpoint or a pipeline)")
    cfg = DiffusersSampleConfig(
        path=args.diffusers,
        prompts=args.prompt,
        prompt_embeds=args.prompt_embeds,
        negative_prompt_embeds=args.negative_prompt_embeds,
        frames=args.frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance_scale=args.cfg_scale,
        seed=args.seed,
        strategy=args.strategy,
        cfg_parallel=args.cfg_parallel,
        dtype=args.dtype,
        output_type=args.output_type,
        device=args.device,
    )
    check_pipeline(cfg)
    for file in (cfg.prompt_embeds, cfg.negative_prompt_embeds):
        if file is not None and not Path(file).is_file():
            raise FileNotFoundError(f"{file}: no such file (a torch.save'd tensor or dict)")
    world = _world(args)
    try:
        result = run_job(_sample_diffusers_rank, cfg, world, args)
    except KeyboardInterrupt:
        raise CommandError("interrupted; nothing was written", 130) from None
    if result is None:
        return 0
    report_diffusers(result, args)
    return 0


def report_diffusers(result, args) -> None:
    """Rank 0: write the frames (video, tensor, JSON) and print the per-rank table."""
    import torch

    from dsp.sample.video import tile, write_video

    frames, lay = result.frames, result.layout
    wrote = []
    if args.output_type == "pt":  # (B, F, 3, H, W) in [0, 1] -> (B, 3, F, H, W) in [-1, 1]
        video = frames.float().permute(0, 2, 1, 3, 4) * 2 - 1
        h, w = video.shape[-2:]
        scale = args.scale or max(1, 128 // max(1, min(h, w)))
        wrote.append(
            f"{args.out} ({write_video(args.out, tile(video, scale=scale), fps=args.fps)})"
        )
    if args.save_tensor:
        Path(args.save_tensor).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"frames": frames, "layout": lay}, args.save_tensor)
        wrote.append(args.save_tensor)
    rows = [
        [r, f"{st['total_s']:.3f}", human_bytes(int(st["bytes_sent"]))]
        for r, st in enumerate(result.ranks)
    ]
    title = (
        f"dsp sample --diffusers: {lay['pipeline']}, cfg={lay['cfg']} x sp={lay['sp']} "
        f"({lay['strategy']}), {lay['device']} {lay['dtype']}"
    )
    print_table(title, ["rank", "total s", "sent"], rows)
    print(f"frames {tuple(frames.shape)}; wrote " + (", ".join(wrote) or "nothing"))
    if args.json:
        Path(args.json).write_text(json.dumps({"layout": lay, "ranks": result.ranks}, indent=2))


def check_sizes(cfg, world: int) -> None:
    """The checkpoint is there and intact, and its video has a frame and a patch per sp rank."""
    from dsp.train.loop import TrainConfig, check_sp_fits

    sp = world // 2 if cfg.cfg_parallel else world
    if cfg.checkpoint:
        from dsp.train.checkpoint import read_meta

        tcfg = read_meta(cfg.checkpoint)["config"]  # a clear error if there is none
        train_cfg = TrainConfig(**{**tcfg, "resume": False, "ckpt_dir": None})
    else:
        train_cfg = TrainConfig(model=cfg.model, model_overrides=cfg.model_overrides,
                                frames=cfg.frames, height=cfg.height, width=cfg.width)  # fmt: skip
    check_sp_fits(train_cfg, sp)


def report(result, args, link=None) -> None:
    """Write the video (and tensors, JSON) and print the latency table (rank 0); ``link``:
    the emulated link's :func:`link_meta` (``None`` on loopback)."""
    import torch

    from dsp.sample.video import tile, write_video

    h, w = result.video.shape[-2:]
    scale = args.scale or max(1, 128 // max(1, min(h, w)))
    writer = write_video(args.out, tile(result.video, scale=scale), fps=args.fps)
    if args.save_tensor:
        Path(args.save_tensor).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"latents": result.latents, "video": result.video}, args.save_tensor)
    lay = result.layout
    roles = []
    for r in range(lay["world_size"]):
        c, s = divmod(r, lay["sp"])
        role = ("cond" if c == 0 else "uncond") if lay["cfg"] == 2 else "cond+uncond"
        roles.append(f"{role}, sp {s}/{lay['sp']}")
    rows = [
        [
            r,
            roles[r],
            f"{st['total_s']:.3f}",
            f"{1e3 * st['total_s'] / result.steps:.1f}",
            f"{st['model_ms']:.1f}",
            f"{st['exchange_ms']:.1f}",
            human_bytes(st["bytes_per_step"]),
        ]
        for r, st in enumerate(result.ranks)
    ]
    title = (
        f"dsp sample: {result.steps} steps, cfg={lay['cfg']} x sp={lay['sp']} "
        f"({lay['strategy']}), {lay['device']} {lay['precision']}"
    )
    print_table(
        title,
        [
            "rank",
            "role",
            "total s",
            "ms/step",
            "model ms/step",
            "cfg exchange ms/step",
            "sent/step",
        ],
        rows,
    )
    if link is not None:
        print(f"link: {link['description']}")
    print(f"wrote {args.out} ({tuple(result.video.shape)} video, {writer})")
    if args.json:
        out = {"layout": lay, "steps": result.steps, "ranks": result.ranks}
        if link is not None:
            out["link"] = link
        Path(args.json).write_text(json.dumps(out, indent=2))
