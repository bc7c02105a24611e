"""DSP on diffusers' video models, unchanged: declarations per model class, as data.

>>> from dsp.integrations.diffusers import parallelize
>>> handle = parallelize(pipe)          # or parallelize(pipe.transformer, strategy="ulysses")
>>> frames = pipe(prompt_embeds=..., num_frames=16).frames   # the same on every rank

Each declared class has a small module here (``latte.py``, ``wan.py``, ``animatediff.py``,
``svd.py``) whose ``declarations(model)`` returns its streams and declarations
(docs/parallelize.md); the planner chooses the stages from them. diffusers is imported only
by the caller: importing this package does not import it. Tested with diffusers 0.42.1. How
to declare a class that is not here: docs/diffusers.md.
"""

from __future__ import annotations

import importlib
from typing import Dict, Tuple

from torch import nn

from dsp.integrations.diffusers.apply import DiffusersParallel, ParallelPipeline, parallelize
from dsp.parallelize import PlanError

__all__ = [
    "MODELS",
    "DiffusersParallel",
    "ParallelPipeline",
    "declarations",
    "parallelize",
    "supported",
]

#: Declared classes -> the module of ``dsp.integrations.diffusers`` holding their declarations.
MODELS: Dict[str, str] = {
    "LatteTransformer3DModel": "latte",
    "WanTransformer3DModel": "wan",
    "UNetMotionModel": "animatediff",
    "UNetSpatioTemporalConditionModel": "svd",
}


def supported() -> Tuple[str, ...]:
    """The diffusers classes with declarations."""
    return tuple(MODELS)


def declarations(model: nn.Module):
    """``(streams, declare)`` for ``model``, by its class (or a base class) name."""
    for cls in type(model).__mro__:
        if cls.__name__ in MODELS:
            module = importlib.import_module(f"{__name__}.{MODELS[cls.__name__]}")
            return module.declarations(model)
    raise PlanError(
        f"dsp: no declarations for {type(model).__name__}; declared diffusers classes: "
        f"{', '.join(MODELS)}. To declare another, give its streams and per-module layouts "
        "(docs/diffusers.md, 'Declaring a new model') and call dsp.parallelize directly"
    )
