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
        layer.compile(backend=BACKEND, dynamic=DYNAMIC, **_options(BACKEND))
        compiled.append(layer)
    return compiled


def _options(backend: str) -> dict:
    """Inductor options for seqpack's graphs: none that would guard on the packed length.

    Inductor's mix-order reduction fusion (torch >= 2.10; the two reductions of an RMSNorm
    backward, say) decides, in its default strict mode, with guards on the length T:
    T * H >= 5 Mi elements, T >= 2 H, T >= 4096. A batch whose T falls on the other side of one
    recompiles every layer: measured on an H200 (torch 2.11), a 6.5 s step of mistral-7b at
    T = 866 after batches of 1.4k-7.4k tokens, guard ``1280 <= T <= 8191``. The non-strict mode
    skips those three size checks (torch's own comment: "helpful to avoid recompilations") and
    keeps the fusion. Only the inductor backend takes options; torch without the knob gets none.
    """
    if backend != "inductor":
        return {}
    try:
        from torch._inductor import config as inductor
    except ImportError:
        return {}
    if not hasattr(getattr(inductor, "triton", None), "mix_order_reduction_non_strict_mode"):
        return {}
    return {"options": {"triton.mix_order_reduction_non_strict_mode": True}}


@functools.cache
def loss_chunk(fn):
    """``fn`` (the fused loss's per-chunk softmax and gradient) compiled for CUDA, once.

    ``dynamic=True``: the last chunk of every batch is shorter; one graph serves every length.
    ``fullgraph=True``: the function is pure tensor code, so a break would be a bug.
    """
    return torch.compile(fn, dynamic=True, fullgraph=True, **_options("inductor"))


# Graphs dynamo keeps per code object while a packed forward runs (its default, 8, is shared).
RECOMPILE_LIMIT = 64


def graph_room():
    """Context for one packed forward: room in dynamo's graph cache for every patched model's layers.

    dynamo keeps at most ``recompile_limit`` (8) graphs per code object, then runs it eagerly and
    logs one warning. Every decoder layer's compiled call enters through the same transformers code
    (``GradientCheckpointingLayer``'s call), so the layers of every architecture patched in one
    process share those 8: about two graphs each (a batch of one sequence specialises once), and
    the fifth architecture's layers ran eagerly (measured on CPU, transformers 5.24). The limit is
    raised for seqpack's packed forwards only, never lowered, and left alone inside an outer
    ``torch.compile`` (which does not recompile the layers on its own).
    """
    try:
        from torch._dynamo import config
    except ImportError:
        return contextlib.nullcontext()
    name = next((n for n in ("recompile_limit", "cache_size_limit") if hasattr(config, n)), None)
    if name is None or torch.compiler.is_compiling() or getattr(config, name) >= RECOMPILE_LIMIT:
        return contextlib.nullcontext()
    return config.patch(**{name: RECOMPILE_LIMIT})


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
