"""DSP on diffusers' LattePipeline, unchanged: two CPU processes return one process's frames.

A tiny Latte with random weights (nothing is downloaded), classifier-free guidance, 3 DDIM
steps; `parallelize(pipe)` plans the transformer at its first call and every rank gets the
same frames. With real weights: `LattePipeline.from_pretrained(path)` instead.
Run it (2 CPU processes, gloo): python docs/examples/diffusers_latte.py
"""

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel

import dsp
from dsp.integrations.diffusers import parallelize
from dsp.launch import spawn


def make_pipeline() -> LattePipeline:
    torch.manual_seed(0)
    transformer = LatteTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        video_length=5,
        caption_channels=16,
        cross_attention_dim=16,
    )
    vae = AutoencoderKL(
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
    )
    pipe = LattePipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: LattePipeline) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    prompt, negative = torch.randn(1, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    return pipe(
        negative_prompt=None,
        prompt_embeds=prompt,  # precomputed text embeddings: no text encoder needed
        negative_prompt_embeds=negative,
        video_length=5,  # frames: uneven over 2 ranks
        height=16,
        width=24,
        num_inference_steps=3,
        output_type="latent",
        clean_caption=False,
        mask_feature=False,
        generator=torch.Generator().manual_seed(2),
    ).frames


def main():
    pipe = make_pipeline()
    alone = generate(pipe)  # one process's frames (each rank computes them, to compare)
    handles = parallelize(pipe)  # the transformer; strategy="dsp"
    with dsp.comm_log() as log:
        frames = generate(pipe)
    same = torch.allclose(frames, alone, atol=1e-5, rtol=0)
    return dist.get_rank(), same, log.sent(), str(handles["transformer"].plan)


if __name__ == "__main__":
    results = spawn(main, 2)
    print(results[0][3])
    print("equal to one process:", "yes" if all(r[1] for r in results) else "no")
    for rank, _, sent, _ in results:
        print(f"rank {rank}: sent {sent} bytes")
