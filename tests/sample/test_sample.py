"""Sampling: CFG-parallel x DSP equals one process; the video and the latency table."""

import pytest
import torch

from dsp.cli import main
from dsp.sample import SampleConfig, sample
from dsp.sample.video import to_frames, write_gif_builtin
from dsp.train import TrainConfig, train
from dsp.train.flow import euler_step, guided, interpolate, time_grid, velocity_target

from . import _cases

PROMPTS = ["red circle left", "blue square down"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    train(TrainConfig(steps=6, lr=3e-3, warmup=2, progress=False, ckpt_dir=str(path)))
    return str(path)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """One process, no group: cond and uncond one after the other."""
    return sample(SampleConfig(checkpoint=checkpoint, prompts=PROMPTS, steps=10, cfg_scale=4.0))


@pytest.mark.parametrize(
    "world, cfg_parallel, atol",
    [
        (2, True, 0.0),  # cond on rank 0, uncond on rank 1: the same operations, bit-identical
        (4, True, 1e-6),  # 2 (cfg) x 2 (DSP)
        (2, False, 1e-6),  # DSP on 2 ranks, cond and uncond one after the other
    ],
)
def test_parallel_sampling_equals_one_process(
    pools, checkpoint, reference, world, cfg_parallel, atol
):
    out = pools.run(
        world, _cases.latents, checkpoint=checkpoint, prompts=PROMPTS, steps=10, cfg_scale=4.0,
        cfg_parallel=cfg_parallel,
    )  # fmt: skip
    for r in out:
        assert torch.equal(r["latents"], out[0]["latents"]), "every rank holds the same video"
    diff = (out[0]["latents"] - reference.latents).abs().max().item()
    print(f"world {world} cfg_parallel={cfg_parallel}: max |latent diff| {diff:.2e}")
    assert diff <= atol
    assert out[0]["layout"]["cfg"] == (2 if cfg_parallel else 1)
    assert reference.video.shape == (2, 3, 8, 16, 16)


def test_cfg_parallel_needs_an_even_world(pools):
    with pytest.raises(Exception, match="world size must be even, got 3"):
        pools.run(3, _cases.latents, cfg_parallel=True, steps=1)


def test_flow_math():
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    t = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(interpolate(x0, noise, t), torch.stack([x0[0], noise[1]]))
    # integrating the exact velocity from t = 1 to 0 recovers the data (straight paths)
    x = noise.clone()
    grid = time_grid(4)
    for a, b in zip(grid[:-1], grid[1:]):
        x = euler_step(x, velocity_target(x0, noise), a, b)
    torch.testing.assert_close(x, x0)
    torch.testing.assert_close(guided(x0, noise, 1.0), x0)


def test_builtin_gif_decodes_exactly(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    video = torch.rand(3, 4, 9, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    frames = to_frames(video, scale=3)
    write_gif_builtin(tmp_path / "v.gif", frames)
    img = pil.open(tmp_path / "v.gif")
    assert img.n_frames == 4 and img.size == (21, 27)
    want = ((frames.int() + 25) // 51 * 51).to(torch.uint8)  # the 6x6x6 colour cube
    for i in range(4):
        img.seek(i)
        got = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
        assert torch.equal(got.view(27, 21, 3), want[i])


def test_cli_sample_writes_video_and_latency_table(checkpoint, tmp_path, capsys):
    out = tmp_path / "v.gif"
    rc = main(
        ["sample", "--checkpoint", checkpoint, "--steps", "3", "--cfg-scale", "4",
         "--prompt", "green diamond up", "--out", str(out), "--save-tensor",
         str(tmp_path / "v.pt"), "--json", str(tmp_path / "lat.json")]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "ms/step" in text and "cond+uncond" in text and out.stat().st_size > 0
    saved = torch.load(tmp_path / "v.pt")
    assert saved["video"].shape == (1, 3, 8, 16, 16)


def test_cli_sample_errors(checkpoint, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "a.gif")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["sample", "--prompt", "purple blob", "--out", str(tmp_path / "a.gif")]) == 2
    assert "unknown word" in capsys.readouterr().err
    assert main(["sample", "--world-size", "3", "--cfg-parallel"]) == 2
    assert "even --world-size" in capsys.readouterr().err
