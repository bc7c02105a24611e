"""Memory accounting: bytes of activations autograd saves for backward."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator

import torch

__all__ = ["SavedActivations", "saved_activations"]


@dataclass
class SavedActivations:
    """Unique storages saved for backward inside a :func:`saved_activations` block."""

    storages: Dict[int, int] = field(default_factory=dict)  # data_ptr -> nbytes

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


@contextlib.contextmanager
def saved_activations(exclude: Iterable[torch.Tensor] = ()) -> Iterator[SavedActivations]:
    """Count the bytes of tensors autograd saves for backward (each storage once).

    Tensors sharing storage with anything in ``exclude`` (pass ``model.parameters()``) are
    not activations and are skipped. Storages saved during the block stay alive until backward,
    so their addresses identify them.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    tally = SavedActivations()

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and ptr not in tally.storages:
            tally.storages[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield tally
