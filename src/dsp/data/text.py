"""A fixed text "encoder" for the moving-shapes captions.

Captions are three words, ``"<colour> <shape> <motion>"``, one token each. The embedding of a
token is a fixed random vector (a table drawn from a seeded generator, unit variance), so
conditioning needs no download and is identical everywhere. The *null* caption (for
classifier-free guidance) is the single token ``<null>`` followed by two masked positions.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from dsp.data.shapes import COLORS, MOTIONS, SHAPES

__all__ = ["CAPTION_LEN", "VOCAB", "CaptionEncoder", "parse_prompt", "tokens_of"]

CAPTION_LEN = 3
NULL = "<null>"
#: Token id -> word. Id 0 is the null caption.
VOCAB: Tuple[str, ...] = (NULL, *COLORS, *SHAPES, *MOTIONS)
_IDS = {w: i for i, w in enumerate(VOCAB)}


def tokens_of(color: str, shape: str, motion: str) -> List[int]:
    """Token ids of one caption."""
    return [_IDS[color], _IDS[shape], _IDS[motion]]


def parse_prompt(prompt: str) -> List[int]:
    """``"red circle left"`` -> token ids; the words may come in any order, one of each kind.

    Raises:
        ValueError: naming the unknown words and the vocabulary.
    """
    words = prompt.lower().replace(",", " ").split()
    kinds = {"colour": list(COLORS), "shape": list(SHAPES), "motion": list(MOTIONS)}
    picked = {}
    for w in words:
        kind = next((k for k, ws in kinds.items() if w in ws), None)
        if kind is None or kind in picked:
            why = "an unknown word" if kind is None else f"a second {kind}"
            raise ValueError(
                f"prompt {prompt!r}: {w!r} is {why}; a prompt is one colour "
                f"({', '.join(COLORS)}), one shape ({', '.join(SHAPES)}) and one motion "
                f"({', '.join(MOTIONS)}), e.g. 'red circle left'"
            )
        picked[kind] = w
    missing = [k for k in kinds if k not in picked]
    if missing:
        raise ValueError(
            f"prompt {prompt!r} lacks a {' and a '.join(missing)}; e.g. 'red circle left'"
        )
    return tokens_of(picked["colour"], picked["shape"], picked["motion"])


class CaptionEncoder:
    """Token ids ``(B, 3)`` -> embeddings ``(B, 3, channels)`` and mask ``(B, 3)``.

    Args:
        channels: embedding width (the model's ``caption_channels``).
        seed: seed of the fixed embedding table.
    """

    def __init__(self, channels: int, *, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.channels = channels
        self.table = torch.randn(len(VOCAB), channels, generator=g)  # (V, C)

    def encode(
        self, tokens: Tensor, drop: Optional[Tensor] = None, *, device=None
    ) -> Tuple[Tensor, Tensor]:
        """Embed captions; rows with ``drop[i]`` True become the null caption.

        Returns:
            ``y`` ``(B, 3, C)`` float32 (masked positions are zero) and ``mask`` ``(B, 3)``
            bool (True = real token).
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() != 2 or tokens.shape[1] != CAPTION_LEN:
            raise ValueError(
                f"CaptionEncoder: tokens must be (B, {CAPTION_LEN}), got {tuple(tokens.shape)}"
            )
        mask = torch.ones(tokens.shape, dtype=torch.bool)
        if drop is not None:
            drop = torch.as_tensor(drop, dtype=torch.bool)
            tokens = torch.where(drop[:, None], torch.zeros_like(tokens), tokens)
            mask[:, 1:] &= ~drop[:, None]
        y = self.table[tokens] * mask[..., None]  # (B, 3, C)
        return y.to(device), mask.to(device)

    def null(self, batch: int, *, device=None) -> Tuple[Tensor, Tensor]:
        """``batch`` null captions (the unconditional input of classifier-free guidance)."""
        tokens = torch.zeros(batch, CAPTION_LEN, dtype=torch.long)
        return self.encode(tokens, torch.ones(batch, dtype=torch.bool), device=device)

    def prompts(self, prompts: Sequence[str], *, device=None) -> Tuple[Tensor, Tensor]:
        """Embed text prompts (see :func:`parse_prompt`)."""
        tokens = torch.tensor([parse_prompt(p) for p in prompts], dtype=torch.long)
        return self.encode(tokens, device=device)
