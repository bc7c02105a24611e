"""`dsp sample --diffusers PATH`: a saved diffusers pipeline, unchanged, on 2 ranks.

A tiny LattePipeline (the tiny transformer of dsp.integrations.diffusers.tiny, a tiny VAE,
DDIM, no tokenizer or text encoder) saved with save_pretrained; the text is precomputed
embeddings (torch.save files). fp64: the 2-rank frames equal one process's to 1e-9 (the
sharded run differs only in the summation order of its matmuls).
"""

import json

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402

from dsp.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def latte_dir(tmp_path_factory):
    from diffusers import DDIMScheduler, LattePipeline

    from dsp.integrations.diffusers import tiny

    root = tmp_path_factory.mktemp("latte")
    model, _, _ = tiny.build("latte", frames=5)
    pipe = LattePipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny.vae(torch.float64),
        transformer=model,
        scheduler=DDIMScheduler(),
    )
    pipe.save_pretrained(root / "pipe")
    g = torch.Generator().manual_seed(4)
    emb, neg = (torch.randn(1, 7, 16, generator=g, dtype=torch.float64) for _ in range(2))
    torch.save(emb, root / "emb.pt")
    torch.save(neg, root / "neg.pt")
    torch.save({"prompt_embeds": emb, "negative_prompt_embeds": neg}, root / "both.pt")
    return root


def _args(root, out, world, *extra, text=None, name=None):
    name = name or str(world)
    text = text or ["--prompt-embeds", str(root / "emb.pt"), "--negative-prompt-embeds",
                    str(root / "neg.pt")]  # fmt: skip
    return [
        "sample", "--diffusers", str(root / "pipe"), "--world-size", str(world), *text,
        "--frames", "5", "--height", "16", "--width", "24", "--steps", "2", "--cfg-scale", "4",
        "--dtype", "float64", "--out", str(out / f"video{name}.gif"),
        "--save-tensor", str(out / f"frames{name}.pt"), "--json", str(out / f"run{name}.json"),
        *extra,
    ]  # fmt: skip


def test_two_ranks_write_one_process_frames(latte_dir, tmp_path, capsys):
    assert main(_args(latte_dir, tmp_path, 2)) == 0
    assert "frames (1, 5, 3, 16, 24); wrote" in capsys.readouterr().out
    assert main(_args(latte_dir, tmp_path, 1)) == 0
    two = torch.load(tmp_path / "frames2.pt")["frames"]
    one = torch.load(tmp_path / "frames1.pt")["frames"]
    assert two.shape == one.shape == (1, 5, 3, 16, 24)  # (B, F, C, H, W)
    torch.testing.assert_close(two, one, atol=1e-9, rtol=0)
    run = json.loads((tmp_path / "run2.json").read_text())
    assert run["layout"]["pipeline"] == "LattePipeline" and run["layout"]["sp"] == 2
    assert len(run["ranks"]) == 2 and all(r["bytes_sent"] > 0 for r in run["ranks"])
    assert (tmp_path / "video2.gif").stat().st_size > 0


def test_bad_paths_classes_and_prompts_fail_with_what_to_do(latte_dir, tmp_path, capsys):
    base = ["sample", "--world-size", "2", "--prompt-embeds", str(latte_dir / "emb.pt")]
    assert main(base + ["--diffusers", str(tmp_path)]) == 2
    assert "has no model_index.json; expected a diffusers pipeline directory" in (
        capsys.readouterr().err
    )
    # a pipeline whose denoiser has no declarations
    other = tmp_path / "other"
    other.mkdir()
    index = json.loads((latte_dir / "pipe" / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "CogVideoXTransformer3DModel"]
    (other / "model_index.json").write_text(json.dumps(index))
    assert main(base + ["--diffusers", str(other)]) == 2
    err = capsys.readouterr().err
    assert "CogVideoXTransformer3DModel, which dsp has no declarations for" in err
    assert "supported: LatteTransformer3DModel, WanTransformer3DModel, UNetMotionModel" in err
    # a text prompt, but the pipeline has no text encoder
    pipe = str(latte_dir / "pipe")
    assert main(["sample", "--diffusers", pipe, "--prompt", "a red circle"]) == 2
    assert "has no text encoder; pass precomputed embeddings with --prompt-embeds" in (
        capsys.readouterr().err
    )
    # guidance without negative embeddings and no text encoder: named before the denoiser runs
    assert main(["sample", "--diffusers", pipe, "--prompt-embeds", str(latte_dir / "emb.pt")]) == 2
    assert "--negative-prompt-embeds" in capsys.readouterr().err


def test_cfg_parallel_with_a_dict_of_embeddings_writes_one_process_frames(latte_dir, tmp_path):
    # 2 ranks: the unconditional and the conditional half of each call on one rank each
    assert main(_args(latte_dir, tmp_path, 1)) == 0
    both = ["--prompt-embeds", str(latte_dir / "both.pt")]  # a dict of pipeline inputs
    assert main(_args(latte_dir, tmp_path, 2, "--cfg-parallel", text=both, name="cfg")) == 0
    saved = torch.load(tmp_path / "framescfg.pt")
    assert saved["layout"]["cfg"] == 2 and saved["layout"]["sp"] == 1
    torch.testing.assert_close(saved["frames"], torch.load(tmp_path / "frames1.pt")["frames"],
                               atol=1e-9, rtol=0)  # fmt: skip
