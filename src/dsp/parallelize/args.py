"""Read and replace a module's inputs by position or keyword, as its ``forward`` names them.

Real models call blocks with positional and keyword arguments mixed (diffusers' Latte calls
``block(hidden_states, None, encoder_hidden_states, mask, timestep, ...)``); declarations
name inputs either way. :class:`Args` resolves a declared key against ``forward``'s
signature: an ``int`` is a position among its positional parameters, a ``str`` a parameter
name (or a key of its ``**kwargs``).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple, Union

from torch import nn

__all__ = ["Args", "MISSING"]

Arg = Union[int, str]
MISSING = object()


class Args:
    """The argument names of ``module.forward``; resolves declared keys."""

    def __init__(self, module: nn.Module):
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):  # builtins without a signature
            params = []
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positional = [p.name for p in params if p.kind in positional]
        self.varargs = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)
        self.names = {p.name for p in params}
        self.varkw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        self.module = type(module).__name__

    def valid(self, key: Arg) -> bool:
        """Whether ``forward`` can receive ``key``."""
        if isinstance(key, int):
            return key < len(self.positional) or self.varargs
        return key in self.names or self.varkw

    def _locate(self, key: Arg, n_args: int) -> Tuple[Optional[int], Optional[str]]:
        if isinstance(key, int):
            name = self.positional[key] if key < len(self.positional) else None
            return (key if key < n_args else None), name
        if key in self.positional:
            i = self.positional.index(key)
            return (i if i < n_args else None), key
        return None, key

    def get(self, args: tuple, kwargs: Dict[str, Any], key: Arg) -> Any:
        """The value passed for ``key`` (``MISSING`` if none was)."""
        pos, name = self._locate(key, len(args))
        if pos is not None:
            return args[pos]
        if name is not None and name in kwargs:
            return kwargs[name]
        return MISSING

    def set(self, args: tuple, kwargs: Dict[str, Any], key: Arg, value: Any):
        """``(args, kwargs)`` with ``key`` replaced by ``value`` (it must have been passed)."""
        pos, name = self._locate(key, len(args))
        if pos is not None:
            return args[:pos] + (value,) + args[pos + 1 :], kwargs
        kwargs = dict(kwargs)
        kwargs[name] = value
        return args, kwargs

    def items(self, args: tuple, kwargs: Dict[str, Any]):
        """``(position or name, value)`` of every argument passed."""
        yield from enumerate(args)
        yield from kwargs.items()
