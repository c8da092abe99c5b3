"""Causal-LM loss on packed tokens.

A padded batch's next-token targets are shifted inside each row; once the rows are packed into
one sequence, a plain one-step shift would make the last token of one sequence predict the first
token of the next. ``shift_labels`` builds the targets per sequence before packing, so the loss
counts exactly the tokens the unpatched model counts on the same padded batch (when its labels are
-100 at padding, as every transformers collator makes them).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from . import compile as compiling
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


# --------------------------------------------------------------------------- fused linear cross-entropy


def _chunk_size(vocab: int) -> int:
    # About 1 GiB of fp32 logits per chunk whatever the vocabulary (2k tokens at 128k): few, large
    # GEMMs. Smaller chunks made the weight-gradient GEMM split-K bound and multiplied its
    # accumulations (profiled on an H200: scripts/profile_step.py).
    return max(256, (1 << 28) // vocab)


def _chunk_eager(logits, targets, ignore_index: int, need_grad: bool, softcap: float | None = None):
    """Summed loss and d loss / d logits of one chunk, in place over an fp32 copy (the CPU path).

    Args:
        logits: (c, V) in the matmul dtype; targets: (c,) int64.
        softcap: the loss is taken on ``softcap * tanh(logits / softcap)`` (Gemma 2's capped
            logits), in fp32; the gradient is still d loss / d logits.
    Returns:
        (() fp32 summed loss, (c, V) gradient in the logits' dtype or None).
    """
    x = logits.float()  # the same tensor when already fp32: it is not read again by the caller
    if softcap is not None:
        tanh = x.div_(softcap).tanh_()  # (c, V)
        x = tanh * softcap
    lse = torch.logsumexp(x, dim=-1)  # (c,)
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0)
    picked = x.gather(1, safe[:, None]).squeeze(1)
    loss = ((lse - picked) * valid).sum()
    if not need_grad:
        return loss, None
    grad = x.sub_(lse[:, None]).exp_()  # softmax, in place
    grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1.0
    if softcap is not None:
        grad.mul_(tanh.square_().neg_().add_(1.0))  # d cap*tanh(l/cap) / dl = 1 - tanh^2
    return loss, grad.mul_(valid[:, None]).to(logits.dtype)


def _chunk_fusable(logits, targets, ignore_index: int, softcap: float | None = None):
    """The same as ``_chunk_eager``, written for inductor (the CUDA path, compiled).

    No in-place ops and no scatter: compiled, it is one reduction over each row (the log-sum-exp)
    and one pass that reads the logits in their own dtype and writes the gradient in it, instead of
    an fp32 copy and five full passes over it (7 of the 62 ms of a llama-3.2-1b step, profiled).
    A softcap is recomputed in each pass rather than kept (c, V) in memory.
    """
    x = logits.float()
    if softcap is not None:
        tanh = torch.tanh(x / softcap)
        x = tanh * softcap
    lse = torch.logsumexp(x, dim=-1)  # (c,)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    picked = x.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(valid, lse - picked, 0.0).sum()
    cols = torch.arange(x.shape[1], device=x.device)
    grad = torch.exp(x - lse[:, None]) - (cols[None, :] == safe[:, None]).float()
    if softcap is not None:
        grad = grad * (1.0 - tanh * tanh)
    return loss, torch.where(valid[:, None], grad, 0.0).to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` without the (N, V) logits.

    The logits exist one chunk of tokens at a time; their gradient is taken in the forward (as
    Liger-Kernel does), so nothing of size N x V is kept for the backward. Numerics follow
    transformers' loss: the matmul in the weights' dtype, log-softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, softcap: float | None):
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_h else None
        grad_weight = None
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if needs_b else None
        )
        step = _chunk_size(weight.shape[0])
        for start in range(0, n, step):
            h = hidden[start : start + step]  # (c, H)
            t = targets[start : start + step]  # (c,)
            logits = torch.nn.functional.linear(h, weight, bias)  # (c, V), the weights' dtype
            need_grad = needs_h or needs_w or needs_b
            if logits.is_cuda and need_grad:
                chunk_loss, grad = compiling.loss_chunk(_chunk_fusable)(logits, t, ignore_index, softcap)
            else:
                chunk_loss, grad = _chunk_eager(logits, t, ignore_index, need_grad, softcap)
            loss = loss + chunk_loss
            if need_grad:
                if needs_h:
                    grad_hidden[start : start + step] = grad @ weight
                if needs_w:
                    # Accumulated in the weights' dtype by the GEMM itself (C += A @ B, fp32
                    # inside): no (V, H) fp32 buffer and no separate add per chunk.
                    if grad_weight is None:
                        grad_weight = grad.t() @ h
                    else:
                        grad_weight.addmm_(grad.t(), h)
                if needs_b:
                    grad_bias += grad.float().sum(0)
        if needs_w and grad_weight is None:  # no tokens at all
            grad_weight = torch.zeros_like(weight)
        ctx.save_for_backward(
            *(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.present = (needs_h, needs_w, needs_b)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        needs_h, needs_w, needs_b = ctx.present
        _, bias_dtype = ctx.dtypes
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype) if needs_h else None,
            grad_weight * grad_loss.to(grad_weight.dtype) if needs_w else None,
            (grad_bias * grad_loss).to(bias_dtype) if needs_b else None,
            None,
            None,
            None,
        )


@functools.cache
def _parameters(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


@functools.cache
def _liger_loss():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
) -> torch.Tensor:
    """transformers' causal-LM loss on already shifted targets, without materialising the logits.

    Args:
        hidden: (N, H) final hidden states of the packed tokens, any float dtype.
        weight: (V, H) the LM head; bias: (V,) or None.
        targets: (N,) int64 next-token targets, ``ignore_index`` where there is none.
        num_items_in_batch: divide the summed loss by this (gradient accumulation) instead of by the
            number of targets, exactly as transformers' ``fixed_cross_entropy`` does.
        softcap: the loss of ``softcap * tanh(logits / softcap)`` (the capped logits of Gemma 2 and 4).
    Returns:
        () float32 loss.

    Example:
        >>> h, w = torch.randn(5, 8), torch.randn(11, 8)
        >>> t = torch.tensor([1, 2, -100, 4, 5])
        >>> ref = torch.nn.functional.cross_entropy(h @ w.T, t)
        >>> torch.allclose(linear_cross_entropy(h, w, t), ref)
        True
    """
    liger = _liger_loss()
    if liger is not None and softcap is not None and "softcap" not in _parameters(liger):
        liger = None  # a release without the cap: ours
    if liger is not None and (hidden.is_cuda or getattr(liger, "_seqpack_stand_in", False)):
        capped = {} if softcap is None else {"softcap": softcap}
        total = liger(
            hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction="sum", **capped
        )
        total = (total[0] if isinstance(total, tuple) else total).float()  # some versions add a z-loss
    else:
        total = _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, softcap)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
