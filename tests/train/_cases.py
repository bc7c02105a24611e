"""Per-rank bodies for the training tests (module-level: RankPool workers import them)."""

from __future__ import annotations

import os
from pathlib import Path

from dsp.train import TrainConfig, train

#: The tiny run every layout test shares: stdit-tiny on 8 frames of 16x16 pixels
#: (latents 4 x 8 x 8 x 8 -> 8 x 16 tokens), global batch 4, a short warm-up.
BASE = dict(steps=6, lr=3e-3, warmup=2, progress=False, global_batch=4)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**BASE, **kw})


def losses(**kw):
    """Train on this rank; the per-step global losses."""
    return train(config(**kw)).losses


def run(**kw):
    result = train(config(**kw))
    return {"losses": result.losses, "start": result.start_step, "ckpt": result.checkpoint}


class FailingWriter:
    """A ``path -> StorageWriter`` factory whose writer fails on ``rank`` after writing its
    data files for the checkpoint of ``step`` (``crash``: kill the process, else raise)."""

    def __init__(self, step: int, *, rank: int = 0, crash: bool = False):
        self.step, self.rank, self.crash = step, rank, crash

    def __call__(self, path: Path):
        import torch.distributed as dist
        from torch.distributed.checkpoint import FileSystemWriter

        me = dist.get_rank() if dist.is_initialized() else 0
        if not Path(path).name.startswith(f"step_{self.step:08d}") or me != self.rank:
            return FileSystemWriter(path)
        crash = self.crash

        class Failing(FileSystemWriter):
            def write_data(self, plan, planner):
                fut = super().write_data(plan, planner)
                fut.wait()  # this rank's data files are on disk
                if crash:
                    os._exit(17)  # a hard crash: no exception handler, no cleanup
                raise OSError("simulated failure in the middle of a checkpoint save")

        return Failing(path)


def run_with_failing_save(fail_step: int, fail_rank: int, **kw):
    """Train; the save of ``fail_step`` raises on ``fail_rank`` (every rank sees the error)."""
    try:
        train(config(**kw), storage_writer=FailingWriter(fail_step, rank=fail_rank))
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"
    return None


def save_into_unusable_root(root: str):
    """Rank 0 cannot create the checkpoint directory (``root`` is a file): every rank raises
    at once instead of the others waiting in a barrier for the group's timeout."""
    import time

    import torch
    import torch.distributed as dist

    from dsp.train.checkpoint import save_checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    start = time.monotonic()
    try:
        save_checkpoint(root, 1, model, opt, {}, rank=dist.get_rank())
    except (OSError, RuntimeError) as e:
        return type(e).__name__, str(e), time.monotonic() - start
    raise AssertionError("save_checkpoint did not raise")
