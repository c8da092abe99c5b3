"""Sequence mixers (Gated DeltaNet, Mamba, short convolutions) seeing each packed sequence on its own.

Attention keeps packed sequences apart through ``cu_seqlens``; a recurrent or convolutional mixer
would carry its state from one sequence into the next. transformers' PyTorch fallbacks for these
layers ignore the packing metadata (only the flash-linear-attention / causal-conv1d / mamba-ssm
kernels read it), so each mixer runs on the packed sequences laid out as a right-padded batch
instead: (1, T, H) -> (N, S, H) with its 0/1 mask, the original forward, then back to (1, T, H).
A causal mixer is exact under right padding: a real token never sees the padding after it, and
the mask zeroes the padding where the mixer applies one. Its cost is the padded batch of the
mixer layers alone (N * S tokens instead of T); attention, MLPs and the head stay packed.

Where the mixer's kernels are installed and read packing metadata (flash-linear-attention's
``chunk_gated_delta_rule`` with ``cu_seqlens``, causal-conv1d and mamba-ssm with ``seq_idx``:
``support.mixer_reads_packing`` reads the model file), the mixer runs on the packed input itself
instead, handed that metadata, as transformers' own padding-free collator hands it: no rows.

The mixer call is left out of the compiled layers (a graph break, eager by design): the
fallbacks loop over chunks in Python, which would specialise a compiled graph on every padded
length. The metadata reaches a mixer through the ``**kwargs`` its decoder layer passes on; a
layer that does not pass them (Jamba's, Mamba's) hands them over through the mixer itself, and
runs eager as a whole.
"""

from __future__ import annotations

import functools
import inspect
import threading

import torch
from torch import nn

from .attention import packing
from .packing import from_rows, row_layout, sequence_index, to_rows
from .support import mixer_reads_packing


class _Rows(threading.local):
    """(cu_seqlens, max_seqlen) of each packed forward running in this thread, innermost last:
    per thread, so two models training in two threads never read each other's."""

    def __init__(self):
        self.stack: list = []


_rows = _Rows()


class PackedRows:
    """Context of one packed forward: its packing metadata, for a model that drops the kwargs on
    the way down (Mamba-2's head calls its backbone with named arguments only). The layers whose
    mixers get the metadata by handover (LayerForward) read it from here when their own kwargs
    lack it, at call time: a gradient-checkpoint replay captured it then, so the backward, which
    runs after this context is gone, replays packed too."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int):
        self.rows = (cu_seqlens, max_seqlen)

    def __enter__(self):
        _rows.stack.append(self.rows)

    def __exit__(self, *exc):
        _rows.stack.pop()


_PACKING = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "position_ids")
_METADATA = _PACKING[:-1]  # what tells a kernel where sequences start (not the positions)
_ROWS = "_seqpack_rows"  # on a mixer whose layer drops kwargs: (cu_seqlens, max_seqlen) of this call


class MixerForward:
    """The forward a mixer module gets: the original, on the rows layout of the packed sequences.

    An object holding its module (not a closure, not the bound original): ``copy.deepcopy`` of the
    model then copies it along with the module, and the original is looked up at each call.
    """

    def __init__(self, module: nn.Module, previous):
        self.module = module
        self.previous = previous  # an instance forward that was there before, or None
        self.last_packed = False  # whether its last call outside a backward ran packed

    def __call__(self, *args, **kwargs):
        return _mixer_call(self, args, kwargs)


class LayerForward:
    """The forward of a decoder layer that calls its mixer without ``**kwargs``: it hands the
    packing metadata of each call to its mixers (and runs eager, as the handover is Python state)."""

    def __init__(self, layer: nn.Module, previous, mixers: list[nn.Module]):
        self.layer = layer
        self.previous = previous
        self.mixers = mixers

    def __call__(self, *args, **kwargs):
        return _layer_call(self, args, kwargs)


def _original(module: nn.Module, previous):
    return previous if previous is not None else type(module).forward.__get__(module)


@torch.compiler.disable
def _layer_call(forward: LayerForward, args, kwargs):
    # Its checkpoint function was wrapped by the packed forward (wrap_replays) before it ran.
    with _Handover(forward.mixers, kwargs):
        return _original(forward.layer, forward.previous)(*args, **kwargs)


def wrap_replays(modules) -> None:
    """Make the gradient-checkpoint function of each handover layer hand the metadata over in its
    replay (the backward re-runs the layer after the packed forward is gone). transformers >= 5.24
    checkpoints the class's own forward, not LayerForward; 5.17 reads the function before the
    layer's forward runs, so the packed forward calls this for its layers before running them."""
    for layer in modules:
        forward = layer.__dict__.get("forward")
        replay = layer.__dict__.get("_gradient_checkpointing_func")
        if (
            isinstance(forward, LayerForward)
            and replay is not None
            and not isinstance(replay, _HandoverReplay)
        ):
            layer._gradient_checkpointing_func = _HandoverReplay(replay, forward.mixers)


class _Handover:
    """The packing metadata of one layer call, on that layer's mixers for the call's duration."""

    def __init__(self, mixers: list[nn.Module], kwargs: dict):
        self.mixers = mixers
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is not None:
            self.rows = (cu_seqlens, kwargs.get("max_length_q"))
        else:  # the kwargs were dropped above the layer: the packed forward's own (PackedRows)
            self.rows = _rows.stack[-1] if _rows.stack else None

    # No metadata here (a checkpoint replay in the backward, inside the _HandoverReplay that
    # captured it in the forward): leave the outer handover's in place.

    def __enter__(self):
        if self.rows is not None:
            for mixer in self.mixers:
                mixer.__dict__[_ROWS] = self.rows

    def __exit__(self, *exc):
        if self.rows is not None:
            for mixer in self.mixers:
                mixer.__dict__.pop(_ROWS, None)


class _HandoverReplay:
    """A layer's gradient-checkpoint function whose replayed forward hands the metadata over."""

    def __init__(self, checkpoint, mixers: list[nn.Module]):
        self.checkpoint = checkpoint
        self.mixers = mixers

    def __call__(self, function, *args, **kwargs):
        given = getattr(function, "keywords", None) or {}  # partial(forward, self, **layer kwargs)
        handover = _Handover(self.mixers, given)  # the metadata now, in the forward, for the replay

        def replayable(*a, **k):
            with handover:
                return function(*a, **k)

        return self.checkpoint(replayable, *args, **kwargs)


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


@torch.compiler.disable
def _mixer_call(forward: MixerForward, args, kwargs):
    """Run the mixer on (N, S, H) rows of the packed (1, T, H) input; return the packed output.

    The original forward is looked up here, out of dynamo's reach: a bound method that dynamo
    hands over at the graph break comes back as ``module.forward``, which is this wrapper.
    """
    module = forward.module
    original = _original(module, forward.previous)
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None and module.__dict__.get(_ROWS) is not None:
        cu_seqlens, max_seqlen = module.__dict__[_ROWS]
    in_backward = torch._C._current_graph_task_id() != -1  # a checkpoint replay runs in the backward
    if not in_backward:
        forward.last_packed = cu_seqlens is not None
    if cu_seqlens is None:
        if packing():
            raise RuntimeError(
                f"seqpack: {type(module).__name__} was called without the packing metadata: this model "
                "does not hand its layers' kwargs on, so it cannot be packed. Call seqpack.unpatch(model)."
            )
        if in_backward and forward.last_packed:
            # A replay of a packed call that lost its metadata: activation checkpointing applied
            # from outside the model (torch's checkpoint_wrapper, FSDP's or accelerate's
            # activation_checkpointing) around a layer whose metadata came by handover.
            raise RuntimeError(
                f"seqpack: {type(module).__name__} is replayed by an activation checkpoint without the "
                "packing metadata (a checkpoint_wrapper / FSDP activation_checkpointing around this "
                "model's layers). Turn checkpointing on with the model's own "
                "gradient_checkpointing_enable() (the Trainer's gradient_checkpointing=True) instead."
            )
        return original(*args, **kwargs)  # an unpacked call (generation, a passed-through forward)
    signature = _signature(type(module))
    bound = signature.bind_partial(module, *args, **kwargs)
    hidden = bound.arguments[list(signature.parameters)[1]]  # the first after self: (1, T, H)
    total = hidden.shape[1]
    if mixer_reads_packing(type(module)):
        return _call_with_metadata(original, signature, bound, cu_seqlens, max_seqlen, total)
    layout = row_layout(cu_seqlens, int(max_seqlen), total)

    def rows(value):  # every per-token input (hidden states, residuals, positions) as rows
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and tuple(value.shape[:2]) == (1, total):
            return to_rows(value[0], layout)  # (N, S, ...)
        return value

    for name, param in signature.parameters.items():
        if name not in bound.arguments or name == "self":
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            # The kernels would read these as the (1, T) packing of what is now a padded batch.
            extra = bound.arguments[name]
            bound.arguments[name] = {k: rows(v) for k, v in extra.items() if k not in _PACKING}
        else:
            bound.arguments[name] = rows(bound.arguments[name])
    if "attention_mask" in signature.parameters:
        mask = torch.zeros(layout.rows * layout.width, dtype=torch.long, device=hidden.device)
        bound.arguments["attention_mask"] = mask.index_fill(0, layout.slot, 1).view(layout.rows, layout.width)
    out = original(*bound.args[1:], **bound.kwargs)

    def packed(value):  # (N, S, ...) rows back to (1, T, ...)
        if (
            isinstance(value, torch.Tensor)
            and value.ndim >= 2
            and tuple(value.shape[:2]) == (layout.rows, layout.width)
        ):
            return from_rows(value, layout).unsqueeze(0)
        return value

    return tuple(packed(v) for v in out) if isinstance(out, tuple) else packed(out)


def _call_with_metadata(original, signature, bound, cu_seqlens, max_seqlen, total):
    """The mixer on the packed (1, T, H) input itself, its kernels handed the packing metadata in
    the spellings of transformers' padding-free collator (``DataCollatorWithFlattening``):
    ``cu_seq_lens_q`` (which the model passes on as the kernels' ``cu_seqlens``) and ``seq_idx``.
    A row of one sequence gets none: the kernels' plain call, as unpatched (causal-conv1d takes
    ``seq_idx`` only with channel-last input, which the (1, C, 1) tensor of a one-token row is not).
    """
    metadata = {}
    if cu_seqlens.shape[0] > 2:
        metadata = {
            "cu_seq_lens_q": cu_seqlens,
            "cu_seq_lens_k": cu_seqlens,
            "max_length_q": max_seqlen,
            "max_length_k": max_seqlen,
            "seq_idx": sequence_index(cu_seqlens, total)[None],  # (1, T) int32
        }
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            given = {k: v for k, v in bound.arguments.get(name, {}).items() if k not in _METADATA}
            extra = {k: v for k, v in metadata.items() if k not in signature.parameters}
            bound.arguments[name] = {**given, **extra}
        elif name in _METADATA and (name in metadata or name in bound.arguments):
            bound.arguments[name] = metadata.get(name)  # a named parameter (LFM2's seq_idx on 5.17)
    if "attention_mask" in bound.arguments:
        bound.arguments["attention_mask"] = None  # one packed row: no padding to mask
    return original(*bound.args[1:], **bound.kwargs)


def wrap_mixers(mixers, handover_all: bool = False) -> list[nn.Module]:
    """Give each mixer its MixerForward, and each layer that drops kwargs its LayerForward.

    Args:
        mixers: (decoder layer, mixer module, whether the layer passes **kwargs to it) triples.
        handover_all: every layer hands the metadata over (the model drops the kwargs above its
            layers, so none of them gets it through its own kwargs).
    Returns:
        The modules whose forward was replaced, for ``unwrap``; the eager layers among them are
        the LayerForward ones (``eager_layers``).
    """
    wrapped, handovers = [], {}
    for layer, mixer, passes_kwargs in mixers:
        mixer.forward = MixerForward(mixer, mixer.__dict__.get("forward"))
        wrapped.append(mixer)
        if handover_all or not passes_kwargs:
            handovers.setdefault(id(layer), (layer, []))[1].append(mixer)
    for layer, layer_mixers in handovers.values():
        layer.forward = LayerForward(layer, layer.__dict__.get("forward"), layer_mixers)
        wrapped.append(layer)
    return wrapped


def eager_layers(wrapped) -> set[int]:
    """ids of the decoder layers that run eager (their mixers get the metadata by handover)."""
    return {id(m) for m in wrapped if isinstance(m.__dict__.get("forward"), LayerForward)}


def unwrap(modules) -> None:
    for module in modules:
        replay = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(replay, _HandoverReplay):
            module._gradient_checkpointing_func = replay.checkpoint
        current = module.__dict__.get("forward")
        if isinstance(current, (MixerForward, LayerForward)):
            if current.previous is None:
                del module.forward
            else:
                module.forward = current.previous
