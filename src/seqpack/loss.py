"""Causal-LM loss on packed tokens.

A padded batch's next-token targets are shifted inside each row; once the rows are packed into
one sequence, a plain one-step shift would make the last token of one sequence predict the first
token of the next. ``shift_labels`` builds the targets per sequence before packing, so the loss
counts exactly the tokens the unpatched model counts on the same padded batch (when its labels are
-100 at padding, as every transformers collator makes them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import IGNORE_INDEX, VarlenMetadata


def shift_labels(
    labels: torch.Tensor, attention_mask: torch.Tensor | None, meta: VarlenMetadata
) -> torch.Tensor:
    """Next-token targets of the packed tokens, shifted within each sequence.

    The last real token of a sequence has no target (IGNORE_INDEX), so one sequence never predicts
    the first token of the next, and labels at padding positions are never used.

    Args:
        labels: (B, L) int64 in the padded layout (or (1, T) for a pre-packed batch).
        attention_mask: (B, L) 0/1 or None.
    Returns:
        (1, T) int64.
    """
    if meta.indices is None:
        # Pre-packed: the caller's labels already separate sequences; shift within each one.
        shifted = F.pad(labels.reshape(1, -1)[:, 1:], (0, 1), value=IGNORE_INDEX)
        is_last = torch.zeros_like(shifted, dtype=torch.bool)
        is_last[0, (meta.cu_seqlens[1:] - 1).long()] = True
        return shifted.masked_fill(is_last, IGNORE_INDEX)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, L)
    if attention_mask is not None:
        next_real = F.pad(attention_mask[:, 1:] != 0, (0, 1), value=False)
        shifted = shifted.masked_fill(~next_real, IGNORE_INDEX)
    return shifted.reshape(-1).index_select(0, meta.indices).unsqueeze(0)
