"""``dsp train``: train a small latent video diffusion model with DSP x data parallelism.

The data are procedurally generated moving shapes (nothing is downloaded), mapped to latents
by a fixed patch codec; the objective is rectified flow. The processes form a (dp, sp) mesh:
DSP (or another sequence-parallel strategy) on sp, DDP / FSDP2 / a counted all-reduce on dp.

Launch:
  dsp train --dp 2 --sp 2                     # 4 local CPU ranks (gloo), spawned here
  torchrun --nproc-per-node 4 --no-python dsp train --dp 2 --sp 2   # torchrun

Examples:
  dsp train --sp 4 --steps 50 --ckpt-dir ckpt --save-every 10
  dsp train --sp 2 --steps 80 --ckpt-dir ckpt --resume      # continue, any layout
  dsp train --model diffusers:latte --dp 2 --sp 2            # diffusers' Latte, unchanged
"""

from __future__ import annotations

import argparse
import json
import os

import torch.distributed

from dsp.cli.errors import CommandError, add_job_flags, apply_timeout
from dsp.cli.lists import chunk_count
from dsp.cli.table import print_table


def add_set_flag(parser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable): config overrides, collected in ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        type=_override,
        action="append",
        default=[],
        help=help,
    )


def _override(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a video diffusion model: DSP on sp, DDP/FSDP2 on dp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default="stdit-tiny",
        help="dsp.models name (default stdit-tiny), or diffusers:latte (diffusers' "
        "LatteTransformer3DModel, unchanged, tiny random config; --set overrides its "
        "constructor arguments)",
    )
    add_set_flag(g, "model config override, repeatable (e.g. --set depth=4 --set hidden_size=64)")
    g.add_argument("--frames", type=int, default=8, help="video frames (default 8)")
    g.add_argument("--height", type=int, default=16, help="video height in pixels (default 16)")
    g.add_argument("--width", type=int, default=16, help="video width in pixels (default 16)")
    g.add_argument("--codec-factor", type=int, default=2, help="pixels per latent (default 2)")
    g.add_argument("--cond-dropout", type=float, default=0.1, help="caption dropout for CFG")
    g.add_argument("--seed", type=int, default=0, help="model and data seed (default 0)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=20, help="total steps (default 20)")
    g.add_argument("--global-batch", type=int, default=4, help="samples per step, all dp")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    g.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default 10)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute blocks in backward"
    )
    g.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="autocast: auto = bf16 on CUDA, fp32 on CPU",
    )

    g = p.add_argument_group("parallelism")
    g.add_argument("--world-size", type=int, default=None, help="local ranks to spawn")
    g.add_argument("--dp", type=int, default=None, help="data-parallel degree")
    g.add_argument("--sp", type=int, default=None, help="sequence-parallel degree")
    g.add_argument("--strategy", default="dsp", help="sequence parallelism on sp (default dsp)")
    g.add_argument(
        "--plan",
        default="auto",
        help="dsp's plan: auto (the planner, for these shapes), hand (the paper's placement) "
        "or a plan JSON file (dsp plan --json)",
    )
    g.add_argument(
        "--chunks",
        type=chunk_count,
        default=None,
        help="dsp: run each compute stage that can in k overlapped slices, forward and "
        "backward; auto: the planner chooses per stage from predicted time on --cluster",
    )
    g.add_argument(
        "--cluster",
        default=None,
        help="the machine --chunks auto plans for: a preset (8xh100-nvlink, 2x8xh100-ib) or a "
        "JSON file (dsp simulate's)",
    )
    g.add_argument(
        "--data-parallel",
        choices=("ddp", "fsdp", "manual"),
        default="ddp",
        help="gradient averaging over all ranks: DDP, FSDP2 fully_shard, or one counted "
        "all-reduce (default ddp)",
    )
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per rank (spawned ranks: 1)"
    )

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--ckpt-dir", default=None, help="checkpoint directory (DCP)")
    g.add_argument("--save-every", type=int, default=0, help="save every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="complete checkpoints to keep (default 2)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=False,
        choices=("auto", "required"),
        help="resume from the newest intact checkpoint in --ckpt-dir (a damaged newer one is "
        "named and skipped); without one, start at step 0 (auto) or fail (--resume=required)",
    )
    g.add_argument(
        "--log-every",
        type=int,
        default=1,
        help="print a line every N steps (no terminal, or no rich)",
    )
    g.add_argument("--log-json", default=None, help="write losses and timings as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or step lines")
    g = p.add_argument_group("failures")
    add_job_flags(g, timeout=300, what="job")
    p.set_defaults(func=run)


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or any env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def local_world(world_size, degrees) -> int:
    """The number of local ranks to spawn: ``--world-size``, else the product of the degrees."""
    if world_size is not None:
        if world_size < 1:
            raise ValueError(f"--world-size must be >= 1, got {world_size}")
        return world_size
    n = 1
    for d in degrees:
        n *= d or 1
    return n


def _train_rank(cfg):
    from dsp.train import train

    return train(cfg)


def config_from_args(args):
    from dsp.train import TrainConfig

    sp = args.sp if (args.sp is not None or args.dp is not None) else 1
    if args.dp is None and args.sp is None and args.world_size is not None:
        sp = args.world_size  # `--world-size N` alone: all sequence parallel
    return TrainConfig(
        model=args.model,
        model_overrides=dict(args.overrides),
        frames=args.frames,
        height=args.height,
        width=args.width,
        codec_factor=args.codec_factor,
        global_batch=args.global_batch,
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        dp=args.dp,
        sp=sp,
        strategy=args.strategy,
        plan=args.plan,
        chunks=args.chunks,
        cluster=args.cluster,
        data_parallel=args.data_parallel,
        activation_checkpointing=args.activation_checkpointing,
        precision=args.precision,
        device=args.device,
        seed=args.seed,
        cond_dropout=args.cond_dropout,
        ckpt_dir=args.ckpt_dir,
        save_every=args.save_every,
        keep=args.keep,
        resume=args.resume or False,
        log_every=args.log_every,
        progress=not args.no_progress,
        log_json=args.log_json,
    )


def set_threads(threads) -> None:
    if threads is not None:
        import torch

        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def run_job(fn, cfg, world: int, args):
    """Run ``fn(cfg)`` on this torchrun process, or on ``world`` local CPU ranks.

    Returns rank 0's result, or ``None`` on the other torchrun ranks. Under torchrun the
    process group is destroyed afterwards, also when ``fn`` raises.
    """
    if under_torchrun():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        heartbeats = _heartbeats(rank, world_size)
        try:
            result = fn(cfg)
        except Exception as e:
            raise _attributed(e, heartbeats, rank) from e
        finally:
            if heartbeats is not None:
                heartbeats.close()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return result if rank == 0 else None
    if world == 1:
        return fn(cfg)
    if args.device == "cuda":
        raise ValueError(
            "local multi-rank runs use CPU ranks (gloo); on GPUs start one process per GPU "
            "with torchrun (see docs/training.md)"
        )
    from dsp.launch import RankPool
    from dsp.mesh import default_timeout

    timeout = default_timeout().total_seconds()  # --timeout / DSP_TIMEOUT (apply_timeout)
    with RankPool(world, timeout=timeout, threads=args.threads or 1) as pool:
        return pool.run(fn, cfg)[0]


def _heartbeats(rank: int, world_size: int):
    """Heartbeats through torchrun's store (None without one: MASTER_ADDR/PORT unset)."""
    if world_size < 2 or "MASTER_ADDR" not in os.environ:
        return None
    from dsp.watchdog import StoreHeartbeats

    try:
        return StoreHeartbeats(rank, world_size)
    except Exception:  # noqa: BLE001 - a job without heartbeats still runs
        return None


def _attributed(error: Exception, heartbeats, rank: int) -> Exception:
    """A collective that timed out or lost its peer: name the ranks that stopped beating."""
    from dsp.rank_error import SECONDARY, first_line

    text = first_line(f"{type(error).__name__}: {error}")
    if heartbeats is None or not any(p in text for p in SECONDARY):
        return error
    silent = heartbeats.silent()
    if silent is None:
        who = "torchrun's store does not answer (its host is gone or stopped)"
    elif silent:
        who = ", ".join(f"rank {r}" for r in silent) + " stopped answering (no heartbeat)"
    else:
        return error
    return CommandError(f"{who}; rank {rank} gave up: {text}", 1)


def check_ckpt_flags(cfg) -> None:
    """``--ckpt-dir`` usable (a writable directory with room for one checkpoint) and
    ``--resume=required`` satisfiable, before any rank starts."""
    import torch

    from dsp.train.checkpoint import check_ckpt_dir, checkpoint_bytes, latest_checkpoint
    from dsp.train.loop import build_video_model

    with torch.device("meta"):
        model = build_video_model(cfg.to_dict())
    check_ckpt_dir(cfg.ckpt_dir, checkpoint_bytes(model))
    if cfg.resume == "required" and latest_checkpoint(cfg.ckpt_dir) is None:
        raise ValueError(f"--resume=required: no checkpoint in {cfg.ckpt_dir}")


def interrupted(ckpt_dir) -> str:
    """What Ctrl-C leaves: the newest intact checkpoint, after removing a partial save."""
    if not ckpt_dir:
        return "interrupted; nothing was saved (no --ckpt-dir)"
    from dsp.train.checkpoint import intact_checkpoint, remove_partial

    remove_partial(ckpt_dir)  # a save the interruption cut short: never read, removed
    ckpt, _ = intact_checkpoint(ckpt_dir)
    if ckpt is None:
        return f"interrupted; no intact checkpoint in {ckpt_dir} yet"
    return f"interrupted; {ckpt} is intact: continue with --resume"


def run(args) -> int:
    from dsp.train.loop import check_sp_fits
    from dsp.train.runtime import ParallelDims
    from dsp.watchdog import check_local_world

    apply_timeout(args)
    set_threads(args.threads)
    cfg = config_from_args(args)
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if args.world_size is not None and args.world_size != world:
            raise ValueError(
                f"--world-size {args.world_size} but torchrun started {world} processes"
            )
    else:
        for name, degree in (("dp", cfg.dp), ("sp", cfg.sp)):
            if degree is not None and degree < 1:
                raise ValueError(f"--{name} must be >= 1, got {degree}")
        world = local_world(args.world_size, (cfg.dp, cfg.sp))
        check_local_world(world, force=args.force)
    dims = ParallelDims.resolve(("dp", "sp"), (cfg.dp, cfg.sp), world)
    check_sp_fits(cfg, dims["sp"])
    if cfg.global_batch % dims["dp"]:
        raise ValueError(
            f"--global-batch {cfg.global_batch} is not divisible by dp={dims['dp']}: every "
            "data-parallel replica must get the same number of samples"
        )
    if cfg.ckpt_dir:
        check_ckpt_flags(cfg)
    try:
        result = run_job(_train_rank, cfg, world, args)
    except KeyboardInterrupt:
        if under_torchrun() and int(os.environ["RANK"]) != 0:  # rank 0 speaks for the job
            raise CommandError("interrupted", 130) from None
        raise CommandError(interrupted(cfg.ckpt_dir), 130) from None
    if result is None:
        return 0
    lay = result.layout
    rows = [
        ["layout", f"dp={lay['dp']} x sp={lay['sp']} ({lay['world_size']} ranks)"],
        ["strategy / data parallel", f"{lay['strategy']} / {lay['data_parallel']}"],
        ["device / precision", f"{lay['device']} / {lay['precision']}"],
        ["steps run", f"{result.start_step} -> {result.end_step}"],
        ["first / last loss", _first_last(result.losses)],
        ["tokens / s", f"{result.tokens_per_s:,.0f}"],
        ["checkpoint", result.checkpoint or "-"],
    ]
    print_table("dsp train", ["", "value"], rows)
    return 0


def _first_last(losses) -> str:
    if not losses:
        return "- (nothing to do)"
    return f"{losses[0]:.5f} / {losses[-1]:.5f}"
