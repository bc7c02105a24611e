"""``dsp sample --diffusers PATH``: a saved diffusers pipeline, unchanged, on N ranks.

Every rank loads the pipeline directory (``DiffusionPipeline.from_pretrained(PATH)``: local
files only), parallelizes its denoiser with :func:`dsp.integrations.diffusers.parallelize`
(the strategy on all ranks, or CFG-parallel: the unconditional and conditional halves of
each call on two halves of the ranks) and runs the whole pipeline with the same seed, so
every rank computes the same frames; rank 0's are returned. The text is a prompt (the
pipeline's own tokenizer and text encoder) or precomputed embeddings (``torch.save`` files),
which a pipeline saved without a text encoder needs.

:func:`check_pipeline` reads ``model_index.json`` before any rank starts: a directory that
is not a pipeline, a denoiser class without declarations, and a prompt for a pipeline
without a text encoder are refused there, with what to do instead.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

__all__ = [
    "DTYPES",
    "DiffusersSampleConfig",
    "DiffusersSampleResult",
    "check_pipeline",
    "load_embeds",
    "sample_diffusers",
]

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: The components of a pipeline that are its denoiser (as dsp.integrations.diffusers.apply).
DENOISERS = ("transformer", "transformer_2", "unet")


@dataclass
class DiffusersSampleConfig:
    """What ``dsp sample --diffusers PATH`` does (its flags); ``None``: the pipeline's default."""

    path: str
    prompts: Optional[List[str]] = None
    prompt_embeds: Optional[str] = None  # a torch.save file: a tensor or a dict of call inputs
    negative_prompt_embeds: Optional[str] = None
    frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    seed: int = 0
    strategy: str = "dsp"
    cfg_parallel: bool = False
    dtype: str = "float32"
    output_type: str = "pt"
    device: str = "auto"
    timeout: Optional[float] = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.prompts and self.prompt_embeds:
            raise ValueError("give --prompt or --prompt-embeds, not both")
        if not self.prompts and not self.prompt_embeds:
            raise ValueError("--diffusers needs --prompt TEXT or --prompt-embeds FILE.pt")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.timeout is not None:
            from dsp.mesh import parse_timeout

            self.timeout = parse_timeout(self.timeout, "--timeout")


@dataclass
class DiffusersSampleResult:
    """Rank 0's frames (CPU; the pipeline's ``.frames`` for ``output_type``), the layout and
    per rank ``{"total_s", "bytes_sent"}``."""

    frames: Tensor
    layout: Dict[str, Any]
    ranks: List[Dict[str, float]]


def check_pipeline(cfg: DiffusersSampleConfig) -> Dict[str, Any]:
    """``model_index.json`` of ``cfg.path``, after the checks that need no rank (see the
    module doc); raises ValueError or FileNotFoundError with what to do."""
    from dsp.integrations.diffusers import supported

    path = Path(cfg.path)
    index = path / "model_index.json"
    if not index.is_file():
        what = "does not exist" if not path.exists() else "has no model_index.json"
        raise FileNotFoundError(
            f"--diffusers {cfg.path}: {what}; expected a diffusers pipeline directory, as "
            "pipe.save_pretrained(PATH) writes it (local files only: nothing is downloaded)"
        )
    spec = json.loads(index.read_text())
    denoisers = {k: v for k, v in spec.items() if k in DENOISERS and _class(v)}
    if not denoisers:
        raise ValueError(
            f"--diffusers {cfg.path}: {spec.get('_class_name', 'the pipeline')} has no "
            f"transformer or unet to parallelize (components: {sorted(_components(spec))})"
        )
    for name, value in denoisers.items():
        if _class(value) not in supported():
            raise ValueError(
                f"--diffusers {cfg.path}: its {name} is a {_class(value)}, which dsp has no "
                f"declarations for; supported: {', '.join(supported())} (docs/diffusers.md)"
            )
    if cfg.prompts and not _class(spec.get("text_encoder")):
        raise ValueError(
            f"--prompt: {spec.get('_class_name', 'the pipeline')} in {cfg.path} has no text "
            "encoder; pass precomputed embeddings with --prompt-embeds FILE.pt (torch.save of "
            "a (B, L, C) tensor, or of a dict of pipeline inputs such as prompt_embeds and "
            "negative_prompt_embeds)"
        )
    return spec


def _class(value) -> Optional[str]:
    """``["diffusers", "LatteTransformer3DModel"]`` -> its class name; None for a null entry."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[1]:
        return value[1]
    return None


def _components(spec: Dict[str, Any]) -> List[str]:
    return [k for k, v in spec.items() if not k.startswith("_") and _class(v)]


def load_embeds(cfg: DiffusersSampleConfig) -> Dict[str, Any]:
    """The text inputs of the pipeline call from ``--prompt-embeds`` (a tensor: the prompt's
    embeddings; a dict: pipeline inputs) and ``--negative-prompt-embeds`` (a tensor)."""
    if cfg.prompts:
        return {"prompt": list(cfg.prompts)}
    out: Dict[str, Any] = {}
    for key, file in (
        ("prompt_embeds", cfg.prompt_embeds),
        ("negative_prompt_embeds", cfg.negative_prompt_embeds),
    ):
        if file is None:
            continue
        value = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(value, dict):
            out.update(value)
        elif torch.is_tensor(value):
            out[key] = value if value.dim() == 3 else value.unsqueeze(0)  # (L, C) -> (1, L, C)
        else:
            raise ValueError(f"{file}: expected a tensor or a dict, got {type(value).__name__}")
    return out


def _call_inputs(pipe, cfg: DiffusersSampleConfig, dtype: torch.dtype, device) -> Dict[str, Any]:
    """The pipeline call's keyword inputs: only what was given, under the pipeline's names."""
    params = inspect.signature(type(pipe).__call__).parameters
    call = {
        k: (v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in load_embeds(cfg).items()
    }
    if "negative_prompt_embeds" in call and "negative_prompt" in params:
        call["negative_prompt"] = None  # embeddings instead of the (default "") text
    frames = "video_length" if "video_length" in params else "num_frames"
    given = {
        frames: cfg.frames,
        "height": cfg.height,
        "width": cfg.width,
        "num_inference_steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "output_type": cfg.output_type,
    }
    call.update({k: v for k, v in given.items() if v is not None})
    unknown = sorted(k for k in call if k not in params and "kwargs" not in params)
    if unknown:
        raise ValueError(f"{type(pipe).__name__} takes no {', '.join(unknown)}")
    needs_negative = "negative_prompt_embeds" not in call and "prompt" not in call
    scale = call.get("guidance_scale", _default(params, "guidance_scale"))
    if needs_negative and pipe.components.get("text_encoder") is None and (scale or 0) > 1:
        raise ValueError(
            f"guidance scale {scale} runs classifier-free guidance, whose negative prompt "
            "needs the text encoder this pipeline lacks: give --negative-prompt-embeds "
            "FILE.pt (or a dict file with negative_prompt_embeds), or --cfg-scale 1"
        )
    return call


def _default(params, name: str):
    p = params.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def sample_diffusers(cfg: DiffusersSampleConfig) -> DiffusersSampleResult:
    """Run the pipeline on this rank (every rank of the world calls it); see the module doc."""
    from datetime import timedelta

    from diffusers import DiffusionPipeline

    from dsp.comm import collectives as C
    from dsp.comm.log import comm_log
    from dsp.integrations.diffusers import parallelize
    from dsp.mesh import default_timeout, set_group_timeouts
    from dsp.train.runtime import init_runtime

    timeout = timedelta(seconds=cfg.timeout) if cfg.timeout else default_timeout()
    rt = init_runtime(device=cfg.device, timeout=timeout)
    dtype = DTYPES[cfg.dtype]
    pipe = DiffusionPipeline.from_pretrained(cfg.path, dtype=dtype, local_files_only=True)
    pipe.to(rt.device)
    pipe.set_progress_bar_config(disable=True)
    call = _call_inputs(pipe, cfg, dtype, rt.device)
    if rt.distributed:
        parallelize(pipe, strategy=cfg.strategy, cfg=cfg.cfg_parallel)
        set_group_timeouts(timeout)  # the groups CFG-parallel made too
    start = time.perf_counter()
    with torch.no_grad(), comm_log() as log:
        frames = pipe(**call, generator=torch.Generator().manual_seed(cfg.seed)).frames
    total = time.perf_counter() - start
    if not torch.is_tensor(frames):  # a list of PIL images or numpy arrays per video
        raise ValueError(f"--output-type {cfg.output_type} gave no tensor; use pt or latent")
    mine = torch.tensor([total, float(log.bytes_sent)], dtype=torch.float64, device=rt.device)
    if rt.distributed:
        stats = C.all_gather(mine, [2] * rt.world_size, None, tag="stats")
        stats = stats.view(rt.world_size, 2).cpu().tolist()
    else:
        stats = [mine.cpu().tolist()]
    n = rt.world_size
    layout = {
        "pipeline": type(pipe).__name__,
        "world_size": n,
        "cfg": 2 if cfg.cfg_parallel and rt.distributed else 1,
        "sp": n // 2 if cfg.cfg_parallel and rt.distributed else n,
        "strategy": cfg.strategy if rt.distributed else "none",
        "device": str(rt.device),
        "dtype": cfg.dtype,
    }
    ranks = [{"total_s": s[0], "bytes_sent": s[1]} for s in stats]
    return DiffusersSampleResult(frames.detach().cpu(), layout, ranks)
