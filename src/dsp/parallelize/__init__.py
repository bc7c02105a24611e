"""``dsp.parallelize``: apply DSP to any model from outside, with plans a planner can choose.

>>> import dsp.parallelize
>>> plan = dsp.parallelize.plan_model(model, example_inputs, world_size=4)
>>> print(plan)                                    # a table; plan.to_json() to save it
>>> handle = dsp.parallelize(model, plan, group)   # hooks; the model's code is unchanged
>>> loss_fn(model(*inputs)).backward(); handle.sync_grads()

The package itself is callable: ``dsp.parallelize(model, plan, group)`` is
:func:`~dsp.parallelize.apply.parallelize`. See docs/parallelize.md.
"""

from __future__ import annotations

import sys
import types

from dsp.parallelize.apply import Parallelized, parallelize
from dsp.parallelize.check import check_plan, validate
from dsp.parallelize.compile import Act, Hook, compile_plan
from dsp.parallelize.cost import PlanCost, simulate
from dsp.parallelize.plan import ParamStyle, Plan, PlanError, Stage, Stream
from dsp.parallelize.planner import Recording, plan_model, record
from dsp.parallelize.timing import Timing, choose_chunks
from dsp.parallelize.trace import Trace, declare_trace, trace_model

__all__ = [
    "Act",
    "Hook",
    "ParamStyle",
    "Parallelized",
    "Plan",
    "PlanCost",
    "PlanError",
    "Recording",
    "Stage",
    "Stream",
    "Timing",
    "Trace",
    "check_plan",
    "choose_chunks",
    "compile_plan",
    "declare_trace",
    "parallelize",
    "plan_model",
    "record",
    "simulate",
    "trace_model",
    "validate",
]


class _CallableModule(types.ModuleType):
    """Lets ``dsp.parallelize(model, plan, group)`` call :func:`parallelize`."""

    def __call__(self, *args, **kwargs) -> Parallelized:
        return parallelize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
