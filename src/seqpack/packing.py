"""Padded batch <-> one packed varlen sequence.

Pure tensor operations, no model knowledge. A padded batch of B rows and L columns with a 0/1
attention mask becomes one (1, T) sequence of its T real tokens, described by the varlen
vocabulary of flash-attention: ``indices`` (where each real token sat in the flattened (B * L)
batch), ``cu_seqlens`` (B + 1 cumulative lengths, int32 as the kernels want) and ``max_seqlen``.

Everything that needs the host (T, max_seqlen, input validation) is read in one device->host copy
per forward; everything else stays on the device, so the packed length is the only dynamic shape.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class VarlenMetadata(NamedTuple):
    """How a padded (B, L) batch maps onto one packed (1, T) sequence.

    Attributes:
        indices: (T,) int64, flat positions of the real tokens in the (B * L) batch; None for an
            input that arrived packed (every token real: the rows laid end to end, T = B * L).
        cu_seqlens: (N + 1,) int32, cumulative lengths of the N packed sequences (one per row
            with a real token for a padded batch; one per document for a packed one). No sequence
            is empty, unless every row is padding.
        max_seqlen: int, the longest sequence.
        position_ids: (..., 1, T) int64, positions of the packed tokens (leading dims for
            multi-axis positions).
        batch_size: B of the inputs.
        seq_len: L of the inputs.
    """

    indices: torch.Tensor | None
    cu_seqlens: torch.Tensor
    max_seqlen: int
    position_ids: torch.Tensor
    batch_size: int
    seq_len: int

    @property
    def total(self) -> int:
        return self.position_ids.shape[-1]


def _nonzero(mask_flat: torch.Tensor, size: int) -> torch.Tensor:
    # nonzero() would sync again to learn its output size; we already know it.
    if hasattr(torch, "nonzero_static"):
        return torch.nonzero_static(mask_flat, size=size).squeeze(-1)
    return mask_flat.nonzero().squeeze(-1)


def _restarting_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) int64 positions that restart at 0 at every sequence start of ``cu_seqlens``."""
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = cu_seqlens[:-1].long().repeat_interleave(seqlens, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def metadata_from_mask(
    attention_mask: torch.Tensor | None,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    position_ids: torch.Tensor | None = None,
) -> VarlenMetadata:
    """Pack a padded batch: the real tokens of each row form one sequence.

    Args:
        attention_mask: (B, L) 0/1 of any dtype, or None for "every token is real". Left padding,
            right padding, or padding inside a row (PEFT's prompt tuning puts its virtual tokens
            before the left padding): a row's real tokens are one sequence, in order.
        batch_size, seq_len: B and L of the inputs.
        device: where the inputs live.
        position_ids: optional (..., B, L) or (..., 1, L) positions given by the caller (leading
            dims for multi-axis positions); gathered if given, otherwise positions count the real
            tokens of each row from 0 (as ``generate`` computes them from the mask).

    Returns:
        VarlenMetadata. Raises ValueError for a mask that is not 0/1.

    Example:
        >>> m = metadata_from_mask(torch.tensor([[1, 1, 0], [1, 1, 1]]), 2, 3, torch.device("cpu"))
        >>> m.cu_seqlens.tolist(), m.max_seqlen, m.position_ids.tolist()
        ([0, 2, 5], 3, [[0, 1, 0, 1, 2]])
    """
    if attention_mask is None:
        mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        bad_values = torch.zeros((), dtype=torch.long, device=device)
        largest = torch.ones((), dtype=torch.long, device=device)
    else:
        bad_values = ((attention_mask != 0) & (attention_mask != 1)).sum()
        largest = attention_mask.max().long()
        mask = attention_mask != 0  # (B, L) bool
    seqlens = mask.sum(dim=1, dtype=torch.int32)  # (B,)
    total, max_seqlen, n_bad, top, nonempty = torch.stack(
        [seqlens.sum().long(), seqlens.max().long(), bad_values, largest, (seqlens > 0).sum().long()]
    ).tolist()  # the one host sync of a forward
    if n_bad:
        segments = (
            " It looks like a segment-id mask (1, 2, 3 ... per document), which transformers does not read either: pack the documents with position_ids restarting at 0 per document and no attention_mask (DataCollatorWithFlattening)."
            if top > 1
            else ""
        )
        raise ValueError(
            "attention_mask must hold only 0 and 1 (1 = real token, 0 = padding); "
            f"found {n_bad} other values. Pass a padding mask, not an additive or weighted mask.{segments}"
        )
    indices = _nonzero(mask.flatten(), total)  # (T,)
    if 0 < nonempty < batch_size:
        # An all-padding row is no sequence: the mixer kernels get no empty one in cu_seqlens
        # (flash-linear-attention <= 0.5.0 skips every sequence after an empty one).
        seqlens = seqlens[_nonzero(seqlens > 0, nonempty)]  # (N,)
    cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))  # (N + 1,)
    if position_ids is None:
        packed_pos = _restarting_positions(cu_seqlens, total).unsqueeze(0)  # (1, T)
    else:
        lead = position_ids.shape[:-2]
        flat = position_ids.expand(*lead, batch_size, seq_len).reshape(*lead, batch_size * seq_len)
        packed_pos = flat[..., indices].unsqueeze(-2)  # (..., 1, T)
    return VarlenMetadata(indices, cu_seqlens, max_seqlen, packed_pos, batch_size, seq_len)


def metadata_from_packed(
    batch_size: int,
    seq_len: int,
    device: torch.device,
    *,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> VarlenMetadata:
    """Read the documents of a batch that arrived packed: every token real, no mask.

    This is the format of transformers' DataCollatorWithFlattening and TRL's padding-free collator
    (one row, B = 1), and of collators that pack several documents into each of B rows:
    ``position_ids`` restarting per document, and optionally the flash kwargs (``cu_seqlens``,
    ``max_seqlen``, one row only), which are used as given. The rows are laid end to end.

    Args:
        batch_size, seq_len: B and L of the inputs (T = B * L).
        position_ids: (B, L) or (1, L) int; a document starts at each row start and wherever
            positions do not step by one (transformers' own rule, so both read the same documents).
            With ``cu_seqlens``, also (R, B, L) multi-axis positions (mRoPE), gathered as given.
        cu_seqlens: (N + 1,) int, for B = 1.
        max_seqlen: int.

    Example:
        >>> m = metadata_from_packed(1, 5, torch.device("cpu"), position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
        >>> m.cu_seqlens.tolist(), m.max_seqlen
        ([0, 3, 5], 3)
    """
    total = batch_size * seq_len
    if cu_seqlens is None:
        pos = position_ids.expand(batch_size, seq_len)
        starts = torch.ones_like(pos, dtype=torch.bool)  # (B, L)
        starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
        bounds = torch.cat([starts.flatten().nonzero().flatten(), pos.new_tensor([total])])  # (N + 1,)
        offsets = bounds.tolist()  # the one host sync: the number of documents and the longest
        longest = max(b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True))
        cu_seqlens = bounds.to(device=device, dtype=torch.int32)
        return VarlenMetadata(None, cu_seqlens, longest, pos.reshape(1, -1), batch_size, seq_len)
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32).reshape(-1)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seq_lens_q must hold N + 1 >= 2 offsets; got {cu_seqlens.tolist()}.")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    # One host sync: the kernels trust these values, and a wrong one would not fail, only mislead.
    first, last, shortest, longest = torch.stack(
        [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]
    ).tolist()
    if first != 0 or last != total or shortest < 0:
        raise ValueError(
            f"cu_seq_lens_q must start at 0, never decrease and end at the packed length {total}; it runs "
            f"from {first} to {last}{' and decreases' if shortest < 0 else ''}."
        )
    if max_seqlen is not None and int(max_seqlen) < longest:
        raise ValueError(
            f"max_length_q={int(max_seqlen)} is shorter than the longest sequence in cu_seq_lens_q "
            f"({longest}); pass the longest length (or leave max_length_q out)."
        )
    # The longest sequence itself, not the caller's bound: kernels take it as a hint, but the rows
    # layout of the reference attention and the sequence mixers is that wide.
    max_seqlen = longest
    if shortest == 0 and last > 0:  # an empty document: no sequence (as in metadata_from_mask)
        cu_seqlens = torch.unique_consecutive(cu_seqlens)
    if position_ids is None:
        position_ids = _restarting_positions(cu_seqlens, total).unsqueeze(0)  # (1, T)
    else:
        lead = position_ids.shape[:-2]  # multi-axis positions: (R, B, L) -> (R, 1, T)
        position_ids = position_ids.expand(*lead, batch_size, seq_len).reshape(*lead, 1, total)
    return VarlenMetadata(None, cu_seqlens, int(max_seqlen), position_ids, batch_size, seq_len)


def pack(x: torch.Tensor, meta: VarlenMetadata) -> torch.Tensor:
    """(B, L, ...) -> (1, T, ...): keep the real tokens, in order (every token: rows end to end)."""
    flat = x.reshape(meta.batch_size * meta.seq_len, *x.shape[2:])
    if meta.indices is None:
        return flat.unsqueeze(0)
    return flat.index_select(0, meta.indices).unsqueeze(0)


def unpack(x: torch.Tensor, meta: VarlenMetadata) -> torch.Tensor:
    """(1, T, ...) -> (B, L, ...): real tokens back in place, zeros at padding."""
    rest = x.shape[2:]
    if meta.indices is None:
        return x.reshape(meta.batch_size, meta.seq_len, *rest)
    out = x.new_zeros(meta.batch_size * meta.seq_len, *rest)
    out = out.index_copy(0, meta.indices, x[0])
    return out.view(meta.batch_size, meta.seq_len, *rest)


# --------------------------------------------------------------------------- the rows layout


class RowLayout(NamedTuple):
    """The packed sequences laid out as a right-padded batch of N rows of S = max_seqlen tokens.

    Attributes:
        slot: (T,) int64, each packed token's place in the flattened (N * S) rows.
        rows: N, the number of sequences.
        width: S, the longest sequence.
    """

    slot: torch.Tensor
    rows: int
    width: int


def sequence_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) int32: which packed sequence each token is in, the ``seq_idx`` of causal-conv1d and mamba-ssm.

    Example:
        >>> sequence_index(torch.tensor([0, 2, 5]), 5).tolist()
        [0, 0, 1, 1, 1]
    """
    pos = torch.arange(total, device=cu_seqlens.device)  # (T,)
    return (torch.searchsorted(cu_seqlens.long(), pos, right=True) - 1).int()


def row_layout(cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> RowLayout:
    """Where each of the T packed tokens goes in a right-padded (N, S) layout, on the device.

    No host sync and no data-dependent loop, so compiled code can use it. N comes from the shape
    of ``cu_seqlens`` (a batch of one sequence compiles one more graph, once: dynamo specialises
    on the size-2 ``cu_seqlens``, then serves every batch).

    Example:
        >>> row_layout(torch.tensor([0, 2, 5]), 3, 5).slot.tolist()
        [0, 1, 3, 4, 5]
    """
    cu = cu_seqlens.long()
    pos = torch.arange(total, device=cu.device)  # (T,)
    seq_id = sequence_index(cu, total).long()  # (T,)
    slot = seq_id * max_seqlen + (pos - cu[seq_id])  # (T,)
    return RowLayout(slot, cu.shape[0] - 1, max_seqlen)


def to_rows(x: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """(T, ...) packed -> (N, S, ...) rows, zeros after each sequence's end."""
    flat = x.new_zeros(layout.rows * layout.width, *x.shape[1:]).index_copy(0, layout.slot, x)
    return flat.view(layout.rows, layout.width, *x.shape[1:])


def from_rows(y: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """(N, S, ...) rows -> (T, ...) packed: the real tokens, in order."""
    return y.reshape(layout.rows * layout.width, *y.shape[2:]).index_select(0, layout.slot)
