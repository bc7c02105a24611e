"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): sharded, reshardable, crash-safe.

Layout of ``--ckpt-dir``::

    latest                 one line: the name of the newest complete checkpoint
    step_00000004/         a complete checkpoint
        .metadata          DCP metadata (tensor -> files, offsets, global shapes)
        __0_0.distcp ...   DCP data, one or more files per rank that holds unique data
        meta.json          step, training config, parallel layout
        manifest.json      size and SHA-256 of every other file (written last)
    step_00000006.tmp/     a save in progress, or one a crash interrupted: never read

Saving writes everything into ``step_N.tmp``; only after every rank has finished (DCP's final
gather, then a barrier) does rank 0 write ``meta.json`` and ``manifest.json``, rename the
directory to ``step_N`` and replace ``latest`` atomically (write ``latest.tmp``, fsync,
``os.replace``). A crash at any point leaves ``latest`` naming the previous complete
checkpoint. A save that fails removes its ``.tmp``; one a crash interrupted is removed at the
next start (:func:`remove_partial`) or save.

Resuming (:func:`intact_checkpoint`) checks the newest ``step_*`` directory against its
manifest (every file present, of its size, with its checksum) and, when a file is missing,
truncated or corrupt, names it and falls back to the next newest intact checkpoint.

Resharding: the model and optimizer state come from
:func:`torch.distributed.checkpoint.state_dict.get_state_dict`, keyed by parameter names
without wrapper prefixes; FSDP2 parameters are DTensors that DCP saves as shards with their
global shapes. A checkpoint saved with any (dp, sp) layout and DDP, FSDP2 or the manual
all-reduce loads into any other (one process included): DCP reads each rank's slice of
each global tensor. The directory must be on a file system every rank can read (on several
nodes: a shared one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from dsp.train.integrity import (  # noqa: F401  (re-exported: the checkpoint API)
    LATEST,
    MANIFEST,
    META,
    _full,
    _step_dirs,
    _write_manifest,
    check_ckpt_dir,
    checkpoint_bytes,
    describe_damage,
    intact_checkpoint,
    remove_partial,
    verify_checkpoint,
)

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "latest_checkpoint",
    "intact_checkpoint",
    "verify_checkpoint",
    "remove_partial",
    "check_ckpt_dir",
    "checkpoint_bytes",
    "read_meta",
]

StorageWriterFactory = Callable[[Path], Any]


@contextlib.contextmanager
def _quiet():
    """Silence DCP's warning that one process without a group saves/loads (intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Union[str, Path]) -> list:
    """Complete checkpoint directories under ``root`` (with a manifest), oldest first."""
    return [p for _, p in _step_dirs(Path(root)) if (p / MANIFEST).is_file()]


def latest_checkpoint(root: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (not verified; see
    :func:`intact_checkpoint`). ``root`` may also be a checkpoint directory itself."""
    root = Path(root)
    if (root / MANIFEST).is_file() or (root / META).is_file():
        return root
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_meta(path: Union[str, Path]) -> Dict[str, Any]:
    """The ``meta.json`` of the newest intact checkpoint under ``path`` (or of ``path``)."""
    ckpt, damaged = intact_checkpoint(path)
    if ckpt is None:
        why = f"; {describe_damage(damaged, None)}" if damaged else ""
        raise FileNotFoundError(
            f"no complete checkpoint in {path} (no intact step_*/ with a {MANIFEST}){why}"
        )
    return json.loads((ckpt / META).read_text())


def _state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_checkpoint(
    root: Union[str, Path],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: Dict[str, Any],
    *,
    rank: int = 0,
    device: Optional[torch.device] = None,
    keep: int = 2,
    storage_writer: Optional[StorageWriterFactory] = None,
) -> Path:
    """Save a checkpoint of ``step`` under ``root``; every rank calls it. Returns its path.

    Args:
        meta: JSON-serialisable description (config, layout) stored in ``meta.json``.
        keep: complete checkpoints to keep (the newest ``keep``; at least 1).
        storage_writer: ``path -> StorageWriter`` (default ``FileSystemWriter``); tests pass
            a failing one to simulate a crash in the middle of a save.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from dsp.train.runtime import barrier, barrier_or_raise

    root = Path(root)
    device = device if device is not None else torch.device("cpu")
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            remove_partial(root)  # interrupted saves: never complete or read
            tmp.mkdir()
        except OSError as e:
            error = e
    # the directory exists before any rank writes into it (or every rank raises)
    barrier_or_raise(device, error, f"creating {tmp}")
    writer = (storage_writer or dcp.FileSystemWriter)(tmp)
    try:
        with _quiet():
            dcp.save(
                _state(model, optimizer), storage_writer=writer, no_dist=not dist.is_initialized()
            )
    except CheckpointException as e:  # a BaseException in DCP: make it an ordinary error
        failures = getattr(e, "failures", {}) or {}
        full = _full(root)  # torch.save reports a full disk as "unexpected pos": say it
        if rank == 0:  # every rank is past DCP's final gather: nothing writes into tmp now
            shutil.rmtree(tmp, ignore_errors=True)
        first = next(iter(failures.values()), e)
        reason = first[0] if isinstance(first, tuple) else first
        reason = str(reason).strip().splitlines()[0] if str(reason).strip() else ""
        raise RuntimeError(
            f"saving the checkpoint of step {step} failed on rank(s) {sorted(failures)}"
            + (f": the file system of {root} is full" if full else f" ({reason})")
            + f"; removed {tmp}, the previous checkpoint is still the latest"
        ) from None
    barrier(device)  # every rank's files are written (DCP's finish step gathered them too)
    if rank == 0:
        try:
            (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
            with open(tmp / META) as f:
                os.fsync(f.fileno())
            _write_manifest(tmp)  # last: sizes and checksums of everything above
            _fsync_dir(tmp)
            old = None
            if final.exists():  # saving the same step again (after a resume): swap safely
                old = root / (final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(root)
            _write_atomic(root / LATEST, final.name + "\n")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            for stale in complete_checkpoints(root)[: -max(1, keep)]:
                if stale != final:  # never the one `latest` now names
                    shutil.rmtree(stale, ignore_errors=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = e
    barrier_or_raise(device, error, f"publishing checkpoint {final}")
    return final


def load_checkpoint(
    path: Union[str, Path],
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    *,
    verify: bool = True,
) -> Dict[str, Any]:
    """Load model (and optimizer) state from a checkpoint into any layout; every rank calls it.

    ``path`` is a checkpoint directory or a root (its newest intact checkpoint, verified on
    every rank that calls this, unless ``verify=False``: :func:`dsp.train.train` verifies once,
    on rank 0, and passes the directory). Returns its ``meta.json``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if verify:
        ckpt, damaged = intact_checkpoint(path)
    else:
        ckpt, damaged = latest_checkpoint(path), []
    if ckpt is None:
        why = f"; {describe_damage(damaged, None)}" if damaged else ""
        raise FileNotFoundError(f"no intact checkpoint in {path}{why}")
    state = _state(model, optimizer)
    with _quiet():
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=not dist.is_initialized())
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    return json.loads((ckpt / META).read_text())


def load_model_weights(path: Union[str, Path], model: nn.Module) -> Dict[str, Any]:
    """Load only the model weights (sampling). Returns the checkpoint's ``meta.json``."""
    return load_checkpoint(path, model, None)
