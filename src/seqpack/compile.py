"""Every torch.compile / dynamo / functorch knob seqpack turns, each with its reason.

Each decoder layer is compiled in place (``layer.compile``), as torchtitan does: the module tree
and state-dict keys stay as they were (no ``_orig_mod.``), gradient checkpointing and PEFT keep
wrapping the same modules, and ``unpatch`` just drops the compiled call.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

# The torch.compile backend for the layers; tests swap in "aot_eager" to count graphs quickly.
BACKEND = "inductor"
# True: every dimension symbolic from the first call. None: torch's automatic dynamic shapes (a
# static graph first, then one with only the dimensions that changed made dynamic).
DYNAMIC: bool | None = True


def compile_layers(layers) -> list[nn.Module]:
    """Compile each decoder layer in place. Returns the layers compiled (for ``uncompile``).

    ``dynamic=True``: the packed length T, the batch size (``cu_seqlens`` has B + 1 entries) and
    ``max_seqlen`` change every batch. Marking them dynamic from the first call gives one graph per
    layer for every batch, instead of a static graph first and a dynamic one after a recompile.
    ``fullgraph=False``: a layer that cannot be captured whole (data-dependent MoE routing in some
    models) still runs, compiled in pieces; ``seqpack-bench --explain`` reports such breaks.
    """
    compiled = []
    for layer in layers:
        layer.compile(backend=BACKEND, dynamic=DYNAMIC)
        compiled.append(layer)
    return compiled


@functools.cache
def loss_chunk(fn):
    """``fn`` (the fused loss's per-chunk softmax and gradient) compiled for CUDA, once.

    ``dynamic=True``: the last chunk of every batch is shorter; one graph serves every length.
    ``fullgraph=True``: the function is pure tensor code, so a break would be a bug.
    """
    return torch.compile(fn, dynamic=True, fullgraph=True)


def uncompile(layers: list[nn.Module]) -> None:
    for layer in layers:
        layer._compiled_call_impl = None


def memory_budget(budget: float | None):
    """Context for one packed forward: torch's activation-memory budget for seqpack's layers only.

    The budget is read by AOT autograd's partitioner when a layer is compiled, which happens inside
    the first packed forward (and any recompile), so setting it there and only there limits it to
    seqpack's compiled layers; nothing process-wide changes. 1.0 stores every activation (the
    default), 0.0 recomputes all it can in the backward.
    """
    if budget is None:
        return contextlib.nullcontext()
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"memory_budget must be in [0, 1], got {budget}")
    return torch._functorch.config.patch(activation_memory_budget=budget)


def can_compile() -> bool:
    """torch.compile needs a working compiler backend for the device; dynamo must be importable."""
    return hasattr(torch, "compile") and hasattr(nn.Module, "compile")
