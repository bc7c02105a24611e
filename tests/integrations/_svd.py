"""Per-rank bodies: diffusers' SVD pipeline, unchanged (the UNet's equality with one
process runs through ``_diffusers.equality("svd")``).

A tiny random config (no downloads), fp64, B = 2, F = 5 frames of 8 x 6 latents (uneven
over 2 and 3 ranks; rows 8, 4 at the two resolutions).
"""

from __future__ import annotations

import torch

import dsp
from dsp.integrations.diffusers import parallelize, tiny

B, F, H, W = 2, 5, 8, 6


def svd(frames: int = F, dtype=torch.float64):
    """The tiny SVD UNet of dsp.integrations.diffusers.tiny and one call's inputs."""
    model, args, kwargs = tiny.build("svd", dtype=dtype, batch=B, frames=frames, height=H, width=W)
    return model, (*args, kwargs)


# ----------------------------------------------------------------------------- pipeline
def svd_pipeline():
    """A tiny ``StableVideoDiffusionPipeline`` built from configs (nothing downloaded)."""
    import PIL.Image
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet, _ = svd()
    torch.manual_seed(3)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
    ).double()
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            projection_dim=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=224,  # the pipeline resizes a PIL image to 224 x 224 for CLIP
            patch_size=56,
        )
    ).double()
    processor = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
        feature_extractor=processor,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(4)
    pixels = torch.randint(0, 256, (16, 24, 3), generator=g, dtype=torch.uint8).numpy()
    image = PIL.Image.fromarray(pixels)
    call = {  # latents of 8 x 12 (the tiny VAE halves the frame)
        "image": image,
        "height": 16,
        "width": 24,
        "num_frames": F,
        "num_inference_steps": 2,
        "decode_chunk_size": F,
        "output_type": "latent",
    }
    return pipe, call


def pipeline_frames(cfg: bool = False):
    """``pipe(...)`` after ``parallelize(pipe)`` returns one process's latents on every rank
    (image conditioning, scheduler steps and classifier-free guidance included)."""
    pipe, call = svd_pipeline()
    ref = pipe(**call, generator=torch.Generator().manual_seed(5)).frames
    handles = parallelize(pipe, cfg=cfg)
    with dsp.comm_log() as log:
        frames = pipe(**call, generator=torch.Generator().manual_seed(5)).frames
    torch.testing.assert_close(frames, ref, atol=1e-9, rtol=0)
    handle = handles.handles["unet"]
    steps = call["num_inference_steps"]
    return {
        "sent": log.sent("forward"),
        "predicted": steps * handle.dry_run().total_forward,
        "shape": tuple(frames.shape),
    }
