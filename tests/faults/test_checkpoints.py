"""Checkpoints you can trust: a truncated, corrupt or missing file is named and the newest
intact checkpoint is used (losses as if nothing happened); partial saves never survive; a
directory that is a file, read-only or full is refused before training (as root: real
read-only and full tmpfs mounts)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time

import pytest

from dsp.cli import main
from dsp.train import train
from dsp.train.checkpoint import intact_checkpoint, verify_checkpoint
from tests.train import _cases

from ._proc import no_tmp


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted single-process run (6 steps)."""
    return train(_cases.config()).losses


def _saved(root):
    """Checkpoints of steps 2 and 4."""
    train(_cases.config(steps=4, save_every=2, keep=3, ckpt_dir=str(root)))
    return root


def _damage(ckpt, how: str):
    """Damage one file of ``ckpt``; return (path, the phrase the message must contain)."""
    data = sorted(ckpt.glob("*.distcp"))[0]
    if how == "truncated":
        size = data.stat().st_size
        with open(data, "r+b") as f:
            f.truncate(size // 2)
        return data, f"has {size // 2} bytes, the manifest says {size} (truncated)"
    if how == "corrupt":  # same size, one byte flipped
        with open(data, "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        return data, "does not match its SHA-256 in the manifest (corrupt)"
    meta = ckpt / ".metadata"
    meta.unlink()
    return meta, "is missing"


@pytest.mark.parametrize("how", ["truncated", "corrupt", "missing"])
def test_resume_names_the_bad_file_and_falls_back(tmp_path, capfd, reference, how):
    root = _saved(tmp_path / "ckpt")
    bad, phrase = _damage(root / "step_00000004", how)
    assert verify_checkpoint(root / "step_00000004") is not None
    result = train(_cases.config(save_every=2, keep=3, ckpt_dir=str(root), resume=True))
    err = capfd.readouterr().err
    assert f"checkpoint step_00000004 is damaged: {bad} {phrase}" in err, err
    assert f"resuming from {root / 'step_00000002'}" in err
    assert result.start_step == 2 and result.losses == reference[2:], "nothing lost"
    assert intact_checkpoint(root)[0] == root / "step_00000006" and no_tmp(root) == []


def test_no_intact_checkpoint(tmp_path, capfd):
    root = _saved(tmp_path / "ckpt")
    for step in (2, 4):
        _damage(root / f"step_{step:08d}", "truncated")
    result = train(_cases.config(steps=1, ckpt_dir=str(root), resume=True))
    err = capfd.readouterr().err
    assert "no intact checkpoint is left" in err and "starting from step 0" in err
    assert result.start_step == 0
    for step in (2, 4):
        _damage(root / f"step_{step:08d}", "missing")
    (root / "step_00000001").rename(root / "spare")  # the one just saved: out of the way
    with pytest.raises(FileNotFoundError, match="--resume=required: no intact checkpoint"):
        train(_cases.config(steps=1, ckpt_dir=str(root), resume="required"))


def test_partial_saves_are_removed_at_start_and_keep(tmp_path):
    root = tmp_path / "ckpt"
    (root / "step_00000009.tmp").mkdir(parents=True)
    (root / "step_00000009.tmp" / "__0_0.distcp").write_bytes(b"half a checkpoint")
    (root / "latest.tmp").write_text("step_00000009\n")
    train(_cases.config(steps=4, save_every=1, keep=2, ckpt_dir=str(root)))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]


def test_cli_resume_without_checkpoint(tmp_path, capsys):
    missing = tmp_path / "typo"
    assert main(["train", "--steps", "1", "--ckpt-dir", str(missing), "--resume=required"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume=required: no checkpoint in {missing}" in err
    assert main(["train", "--steps", "1", "--no-progress", "--ckpt-dir", str(missing),
                 "--resume"]) == 0  # fmt: skip
    assert f"--resume: no checkpoint in {missing}; starting from step 0" in capsys.readouterr().err


# ------------------------------------------------------------------ unusable directories
def _refused(args, capsys, want: str) -> None:
    start = time.monotonic()
    assert main(["train", "--world-size", "2", "--steps", "1", *args]) == 2
    err = capsys.readouterr().err
    took = time.monotonic() - start
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert want in err, err
    assert took < 10, "refused before any rank starts"


def test_ckpt_dir_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("not a directory")
    _refused(["--ckpt-dir", str(target)], capsys, f"--ckpt-dir {target} is a file")


@contextlib.contextmanager
def _tmpfs(path, options: str):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root only): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@needs_root
def test_ckpt_dir_read_only(tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "ro,size=4m") as ro:  # root ignores chmod; a ro mount not
        _refused(["--ckpt-dir", str(ro / "ckpt")], capsys, "is not writable (Read-only file")


@needs_root
def test_ckpt_dir_without_room(tmp_path, capsys):
    with _tmpfs(tmp_path / "small", "size=256k") as small:
        _refused(["--ckpt-dir", str(small)], capsys, "free, one checkpoint needs about 1.6 MiB")


@needs_root
def test_disk_full_in_the_middle_of_a_run(tmp_path, capsys, reference):
    """Room for one checkpoint (the up-front check passes), not two: the second save fails
    with ENOSPC, its partial directory is removed, the first stays; resuming loses nothing."""
    with _tmpfs(tmp_path / "full", "size=2m") as full:
        root = full / "ckpt"
        args = [
            "train",
            "--steps",
            "3",
            "--save-every",
            "1",
            "--keep",
            "5",
            "--no-progress",
            "--lr",
            "3e-3",
            "--warmup",
            "2",
        ]  # fmt: skip  (as _cases.config)
        assert main(args + ["--ckpt-dir", str(root)]) == 1
        err = capsys.readouterr().err
        assert "saving the checkpoint of step 2 failed on rank(s) [0]: the file system" in err
        assert "is full" in err, err
        assert "Traceback" not in err and no_tmp(root) == []
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
        kept = shutil.copytree(root, tmp_path / "kept")
    resumed = train(_cases.config(steps=3, ckpt_dir=str(kept), resume=True))
    assert resumed.start_step == 1 and resumed.losses == reference[1:3]
